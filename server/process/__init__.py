"""The server as a process: the command line, start-up and shutdown, and `--workers N`.

  cli.py          `server --model-repository DIR ...` (click; the flags live in server/config.py)
  run.py          one server process: logging, its event loop, its exit status
  app.py          wiring and lifecycle: load the models, open the ports, ready, SIGTERM drain
  workers.py      --workers N: the supervisor of N worker processes sharing the ports
  worker_role.py  what makes a process one worker among N
  siblings.py     --workers N: a worker's ModelStatistics summed with its siblings'

May import every other subpackage of the server; nothing imports it.
"""

"""`python -m server` runs the `server` command."""

from server.process.cli import main

main(prog_name="server")

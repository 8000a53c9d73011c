"""`python -m server` runs the `server` command."""

from server.cli import main

main(prog_name="server")

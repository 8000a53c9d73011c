"""One server process, from its first log line to its exit status: `server` itself, or
one worker of `server --workers N`."""

from __future__ import annotations

import asyncio
import logging
import sys

import click

from server.config import ServerSettings
from server.process.app import StartupError, serve
from server.process.worker_role import WorkerRole


def configure_logging(settings: ServerSettings, process: str = "") -> None:
    """Log lines to stderr; `process` (a worker's name) tags every line of that process."""
    tag = f"{process} " if process else ""
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s")


def run_server(settings: ServerSettings, role: WorkerRole | None = None) -> int:
    """One server (with `role`: one worker of --workers) until a signal stops it. The exit
    status: 0, or 2 after one line for a start-up problem."""
    try:
        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            runner.run(serve(settings, role))
    except StartupError as error:
        who = "server" if role is None else f"server: worker {role.index}"
        click.echo(f"{who}: error: {error}", err=True)
        return 2
    return 0


def _event_loop_factory():
    """uvloop where it installs (the HTTP endpoint's event loop: measurably faster), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop

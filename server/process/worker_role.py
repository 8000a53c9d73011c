"""`WorkerRole`: what makes one server process a worker among N (`server --workers N`).

The supervisor (server/process/workers.py) gives each worker its role; the worker's server
(server/process/app.py) opens its private socket from it, and its statistics ask the
siblings' sockets (server/process/siblings.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WorkerRole:
    """What makes one server process a worker among `count`."""

    index: int  # 1..count
    count: int
    runtime_dir: Path  # private (0700): the sibling sockets and the metrics files
    secret: str  # proves a call comes from a sibling worker
    # A restarted worker (server/process/supervisor.py): it opens the shared ports only once its
    # models have loaded, so that the kernel keeps giving new connections to its siblings meanwhile.
    replacement: bool = False

    @staticmethod
    def socket_path(runtime_dir: Path, index: int) -> Path:
        return runtime_dir / f"worker-{index}.sock"

    @property
    def own_socket(self) -> Path:
        return self.socket_path(self.runtime_dir, self.index)

    @property
    def sibling_sockets(self) -> dict[int, Path]:
        return {i: self.socket_path(self.runtime_dir, i) for i in range(1, self.count + 1) if i != self.index}

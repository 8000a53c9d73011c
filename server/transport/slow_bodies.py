"""`SlowBodies`: the HTTP endpoint's timeout on request bodies that take too long to arrive
(server/transport/http_app.py answers them 408)."""

from __future__ import annotations

import asyncio


class SlowBodies:
    """Cancels the requests whose bodies take more than `timeout_s` to arrive. One timer
    checks all the bodies still arriving a few times per timeout: asyncio.timeout around
    each read would cost 5 us a request, 5-8 % of all the event loop does for a small one."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._check_every_s = min(1.0, timeout_s / 4)
        self._reading: dict[asyncio.Task, float] = {}  # task -> loop time its body is late at
        self._late: set[asyncio.Task] = set()  # cancelled by `_check`, not yet told
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, task: asyncio.Task) -> None:
        loop = task.get_loop()
        self._reading[task] = loop.time() + self.timeout_s
        if self._timer is None:
            self._timer = loop.call_later(self._check_every_s, self._check, loop)

    def unwatch(self, task: asyncio.Task) -> bool:
        """Stop watching `task` (again is harmless); True when it was cancelled for being late."""
        self._reading.pop(task, None)
        if task not in self._late:
            return False
        self._late.discard(task)
        task.uncancel()
        return True

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for task, late_at in list(self._reading.items()):
            if now >= late_at:
                del self._reading[task]
                self._late.add(task)
                task.cancel()
        self._timer = loop.call_later(self._check_every_s, self._check, loop) if self._reading else None

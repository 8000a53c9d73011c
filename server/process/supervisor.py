"""`--workers N`: the supervisor keeps N workers running, restarting one that dies.

A worker that dies (SIGKILL, a crash, the OOM killer) takes only its own connections with
it: the kernel stops giving the shared ports' new connections to a socket that is gone, so
the siblings take all of them. The supervisor starts a replacement in the same slot after a
backoff (0.5 s, doubling up to 10 s for a slot that keeps dying; back to 0.5 s once a
worker has lived longer than the window below). The replacement loads its models before it
opens the ports (WorkerRole.replacement), so no connection reaches it before it can serve.

A server whose workers keep dying is broken, not unlucky: --max-worker-deaths deaths within
--worker-death-window seconds (5 in 60 by default) stop every worker, with an error naming
the deaths, and the supervisor exits 1 for the orchestrator to see. A worker that exits
with status 2 (its own start-up error, already printed) stops the server at once with 2:
a replacement would fail the same way.

/metrics (the supervisor's) shows ensemble_server_worker_restarts_total{worker} and
ensemble_server_workers_running. A dead worker's live gauges (pending requests, ready) are
dropped from the merged metrics (prometheus_client's mark_process_dead); its counters stay
in the sums.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import mark_process_dead

log = logging.getLogger("server.process.supervisor")

FIRST_RESTART_DELAY_S = 0.5
MAX_RESTART_DELAY_S = 10.0
WORKER_STOP_TIMEOUT_S = 10.0  # beyond the grace period, before a worker that will not stop is killed
POLL_S = 0.5  # the longest the supervisor sleeps between looks at its workers


class TooManyDeaths(Exception):
    """Workers kept dying: the message lists the deaths."""


def describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit status {exitcode}"


@dataclass
class DeathWindow:
    """The deaths within the last `window_s` seconds; `limit` of them is too many."""

    limit: int
    window_s: float
    deaths: deque = field(default_factory=deque)  # (monotonic time, "worker-1 (pid N) killed by SIGKILL")

    def record(self, now: float, what: str) -> None:
        self.deaths.append((now, what))
        while self.deaths and now - self.deaths[0][0] > self.window_s:
            self.deaths.popleft()
        if len(self.deaths) >= self.limit:
            count = len(self.deaths)
            raise TooManyDeaths(f"{count} worker {'death' if count == 1 else 'deaths'} within {self.window_s:g} s "
                                f"(--max-worker-deaths {self.limit}): " + "; ".join(w for _, w in self.deaths))


@dataclass
class _Slot:
    """One of the N workers: the process now in it, and how its last ones fared."""

    index: int
    process: object = None  # multiprocessing.Process, None while waiting to be restarted
    started_at: float = 0.0
    quick_deaths: int = 0  # consecutive deaths of workers that lived less than the window
    restart_at: float | None = None
    restarts: int = 0


class WorkerMetrics:
    """The supervisor's own series, beside the workers' merged ones on /metrics."""

    def __init__(self, slots: list[_Slot]):
        self._slots = slots

    def collect(self):
        restarts = CounterMetricFamily("ensemble_server_worker_restarts", "Workers restarted by the supervisor "
                                       "after they died (--workers).", labels=["worker"])  # fmt: skip
        for slot in self._slots:
            restarts.add_metric([str(slot.index)], slot.restarts)
        yield restarts
        running = GaugeMetricFamily("ensemble_server_workers_running", "Worker processes alive now (--workers).")
        running.add_metric([], sum(1 for slot in self._slots if slot.process is not None and slot.process.is_alive()))
        yield running


class Supervisor:
    def __init__(self, count: int, start: Callable[[int, bool], object], settings, metrics_dir: Path):
        """`start(index, replacement)` starts and returns the worker process for slot `index`."""
        self._start = start
        self._grace_period_s = settings.grace_period_s
        self._window = DeathWindow(settings.max_worker_deaths, settings.worker_death_window_s)
        self._metrics_dir = metrics_dir
        self.slots = [_Slot(index) for index in range(1, count + 1)]
        self.stop = threading.Event()  # set at the first SIGTERM / SIGINT

    def run(self) -> int:
        """Start the workers and keep them running until a signal (0 when all then exit 0)
        or too many deaths (1) or a worker's start-up error (2)."""
        self._forward_signals()
        for slot in self.slots:
            self._launch(slot, replacement=False)
        log.info("started %d workers: pids %s", len(self.slots), ", ".join(str(s.process.pid) for s in self.slots))
        failed = None
        while any(slot.process is not None or slot.restart_at is not None for slot in self.slots):
            failed = self._step(failed)
        if failed is None:
            log.info("all workers stopped")
            return 0
        return failed

    def _step(self, failed: int | None) -> int | None:
        """Reap the workers that exited, restart the ones due; the status to exit with, if decided."""
        running = [slot for slot in self.slots if slot.process is not None]
        due = [slot.restart_at for slot in self.slots if slot.restart_at is not None]
        timeout = max(0.0, min([POLL_S, *(at - time.monotonic() for at in due)]))
        if not running:  # every worker is waiting for its restart
            time.sleep(timeout)
        for sentinel in wait([slot.process.sentinel for slot in running], timeout=timeout) if running else ():
            slot = next(s for s in running if s.process.sentinel == sentinel)
            failed = self._reaped(slot, failed)
        for slot in self.slots:
            if slot.restart_at is not None and time.monotonic() >= slot.restart_at and not self.stop.is_set():
                slot.restart_at = None
                slot.restarts += 1
                self._launch(slot, replacement=True)
                log.info("worker-%d restarted (pid %d; restart %d of this worker)", slot.index, slot.process.pid,
                         slot.restarts)  # fmt: skip
        return failed

    def _reaped(self, slot: _Slot, failed: int | None) -> int | None:
        process, slot.process = slot.process, None
        process.join()
        with contextlib.suppress(OSError):
            mark_process_dead(process.pid, str(self._metrics_dir))
        if self.stop.is_set():  # stopping: only its status matters
            return failed if process.exitcode == 0 or failed is not None else 1
        what = f"worker-{slot.index} (pid {process.pid}) {describe_exit(process.exitcode)}"
        if process.exitcode == 2:
            log.error("%s: its start-up failed; stopping the others", what)
            self._stop_all()
            return 2
        try:
            self._window.record(time.monotonic(), what)
        except TooManyDeaths as error:
            log.error("%s; stopping the server: %s", what, error)
            print(f"server: error: {error}", file=sys.stderr, flush=True)
            self._stop_all()
            return 1
        delay = self._backoff(slot)
        log.error("%s; restarting it in %.1f s (%d death(s) in the last %g s, %d stop the server)", what, delay,
                  len(self._window.deaths), self._window.window_s, self._window.limit)  # fmt: skip
        slot.restart_at = time.monotonic() + delay
        return failed

    def _backoff(self, slot: _Slot) -> float:
        lived = time.monotonic() - slot.started_at
        slot.quick_deaths = 1 if lived > self._window.window_s else slot.quick_deaths + 1
        return min(MAX_RESTART_DELAY_S, FIRST_RESTART_DELAY_S * 2 ** (slot.quick_deaths - 1))

    def _launch(self, slot: _Slot, replacement: bool) -> None:
        slot.process = self._start(slot.index, replacement)
        slot.started_at = time.monotonic()
        if self.stop.is_set():  # a signal came while it started, before it had a pid to pass it to
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.process.pid, signal.SIGTERM)

    def _forward_signals(self) -> None:
        """SIGTERM and SIGINT go to every worker (a second one too: the workers then exit at
        once, as a single server does); no worker is restarted after the first."""
        def on_signal(signum, _frame):
            log.info("%s received: stopping %d workers", signal.Signals(signum).name, len(self.slots))
            self.stop.set()
            for slot in self.slots:
                slot.restart_at = None
                if slot.process is not None and slot.process.pid is not None and slot.process.is_alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(slot.process.pid, signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def _stop_all(self) -> None:
        """Stop every worker (SIGTERM, then SIGKILL past the grace period) and restart none."""
        self.stop.set()
        processes = [slot.process for slot in self.slots if slot.process is not None]
        for slot in self.slots:
            slot.restart_at = None
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
        for process in processes:
            process.join(self._grace_period_s + WORKER_STOP_TIMEOUT_S)
            if process.is_alive():
                log.error("worker (pid %d) did not stop; killing it", process.pid)
                process.kill()

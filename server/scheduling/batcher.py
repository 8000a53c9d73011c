"""Dynamic batching: concurrent requests for one model version become one onnxruntime call.

The callers are gRPC worker threads. `submit` puts a request in a
bounded FIFO queue and returns its `Ticket`; `result` blocks the caller until the ticket is
answered. Each model instance (config.pbtxt instance_group count) is one thread that
takes batches from the queue, runs onnxruntime (which releases the GIL) and answers the
tickets of the batch: a request crosses one thread and back, with no event loop between.

Batch forming follows Triton's rule: take requests from the front until the next one
would push the batch past max_batch_size; if fewer elements than that are queued, first
wait until enough arrive or the oldest request has waited max_queue_delay. While an
instance computes, new requests queue up, so under load batches form by themselves even
with a delay of 0.

With the adaptive delay (`--queue-delay adaptive`, the default) the wait also ends once
the queue holds as many requests as the batcher has recently held at once (queued or
computing: its recent peak, which decays by one per batch). Clients that wait for each
answer before they send again, one of them or sixteen, cannot send more than that, so a
longer wait would only add its delay to every request; under heavier or open-ended load
the peak is higher and the wait is Triton's. `--queue-delay triton` keeps Triton's rule.

- Full queue: the new request is refused at once with RESOURCE_EXHAUSTED.
- A request whose deadline passes while it is queued is dropped before compute; its
  caller gets DEADLINE_EXCEEDED. A request whose call ends (client cancel) is withdrawn
  from the queue at once (`withdraw`, through the call's `CallScope`).
- A failed execution fails the requests of that batch with INTERNAL; the thread goes on.
- Without dynamic batching every request is its own execution, through the same queue.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Callable

import grpc
import numpy as np

from server.errors import InferenceError
from server.observability import tracing
from server.observability.metrics import ModelMetrics
from server.observability.statistics import ModelStats

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]  # a request's or a batch's tensors, by name

# How a request travels through batchers (server/scheduling/steps.py drives it): a generator
# that yields the (batcher, ticket) pairs to wait for, is sent their outputs in that order,
# and returns the request's outputs.
Steps = Generator[list[tuple["DynamicBatcher", "Ticket"]], list[Tensors], Tensors]


@dataclass(frozen=True)
class BatchingPolicy:
    max_batch_size: int  # 0: the model has no batch dimension
    max_queue_delay_s: float
    max_queue_size: int
    dynamic: bool  # gather several requests into one execution
    instances: int = 1  # executions that may run at the same time
    adaptive_delay: bool = False  # stop waiting once the recent peak of held requests is queued


class Ticket:
    """One request in a batcher: its inputs, then its outputs or its error."""

    __slots__ = ("inputs", "batch_size", "deadline", "arrival_ns", "outputs", "error", "queued", "on_answer",
                 "trace", "_answered")

    def __init__(self, inputs: Tensors, batch_size: int, deadline: float | None, trace=None):
        self.inputs = inputs
        self.trace = trace  # tracing on: the span (request or ensemble step) it is part of; else None
        self.batch_size = batch_size
        self.deadline = deadline  # time.monotonic() seconds, or None
        self.arrival_ns = time.monotonic_ns()
        self.outputs: Tensors | None = None
        self.error: InferenceError | None = None
        self.queued = True  # set False, under the batcher's lock, when it leaves the queue
        # Called after the answer, on the answering thread: how an event loop learns of it.
        self.on_answer: Callable[[], None] | None = None
        # A plain lock, held until the ticket is answered: the cheapest one-shot signal
        # between threads that Python has.
        self._answered = threading.Lock()
        self._answered.acquire()

    def answer(self, outputs: Tensors | None, error: InferenceError | None = None) -> None:
        """Called once, by whoever took the ticket out of the queue."""
        self.outputs, self.error = outputs, error
        self._answered.release()
        on_answer = self.on_answer  # read after the release: see `answered` in run_async
        if on_answer is not None:
            on_answer()

    @property
    def answered(self) -> bool:
        return not self._answered.locked()

    def wait(self, timeout: float | None) -> bool:
        """True once answered; False when `timeout` seconds passed first."""
        return self._answered.acquire(timeout=-1 if timeout is None else max(timeout, 0.0))


class CallScope:
    """The tickets one client call holds, so that ending the call withdraws them all.
    gRPC runs `cancel` when the call ends for any reason; answered tickets ignore it."""

    __slots__ = ("_tickets", "trace")

    def __init__(self) -> None:
        self._tickets: list[tuple[DynamicBatcher, Ticket]] = []
        self.trace = None  # tracing on: the call's request span (server/observability/tracing.py)

    def hold(self, batcher: DynamicBatcher, ticket: Ticket) -> None:
        self._tickets.append((batcher, ticket))

    def cancel(self) -> None:
        for batcher, ticket in self._tickets:
            # `queued` only ever turns False, so a ticket seen out of the queue needs no lock
            # (nearly every call ends answered: this is on every request's path).
            if ticket.queued:
                batcher.withdraw(ticket, InferenceError(grpc.StatusCode.CANCELLED, "the call ended before its answer"))


class DynamicBatcher:
    """The scheduler of one ONNX model version."""

    def __init__(self, name: str, version: str, run: Callable[[Tensors], Tensors], policy: BatchingPolicy,
                 stats: ModelStats, metrics: ModelMetrics):  # fmt: skip
        self.name = name
        self.version = version
        self.policy = policy
        self._run = run
        self._stats = stats
        self._metrics = metrics
        self._queue: collections.deque[Ticket] = collections.deque()
        self._queued_elements = 0
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._closed = False
        self._draining = False  # closed, but the instance threads first empty the queue
        self._threads: list[threading.Thread] = []
        self._gathers = policy.dynamic and policy.max_batch_size > 0
        self._batch_limit = policy.max_batch_size if self._gathers else 1
        self._executing = 0  # requests in the batches being computed
        # The most requests held at once lately (queued + executing); it starts high, so a
        # new model waits as Triton does until its traffic has shown what to expect.
        self._peak = max(policy.max_batch_size, 1)
        self.report_pending()

    def report_pending(self) -> None:
        """Bind the pending-requests gauge to this batcher's queue. The callback holds the
        queue, not the batcher: an unloaded batcher is not kept alive by the gauge."""
        queue = self._queue
        self._metrics.report_pending(lambda: len(queue))

    def start(self) -> None:
        for instance in range(self.policy.instances):
            thread = threading.Thread(target=self._serve, name=f"{self.name}-v{self.version}-{instance}", daemon=True)
            thread.start()
            self._threads.append(thread)

    # -- callers' side ---------------------------------------------------------------------
    def submit(self, inputs: Tensors, batch_size: int, deadline: float | None, scope: CallScope | None = None,
               trace=None) -> Ticket:  # fmt: skip
        """Queue a request; `trace` is the span it belongs to when tracing is on."""
        ticket = Ticket(inputs, batch_size, deadline, trace)
        with self._lock:
            if self._closed:
                raise InferenceError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            if len(self._queue) >= self.policy.max_queue_size:
                self._stats.record_failure(0)
                raise InferenceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                     f"model {self.name!r} is overloaded: its queue holds {len(self._queue)} "
                                     f"requests (max_queue_size {self.policy.max_queue_size}); retry later")
            self._queue.append(ticket)
            self._queued_elements += batch_size
            self._peak = max(self._peak, len(self._queue) + self._executing)
            self._arrived.notify()
        if scope is not None:
            scope.hold(self, ticket)
        return ticket

    def result(self, ticket: Ticket) -> Tensors:
        """Block until `ticket` is answered; at its deadline, withdraw it (if still queued)."""
        timeout = None if ticket.deadline is None else ticket.deadline - time.monotonic()
        if not ticket.wait(timeout):
            self.expire_if_queued(ticket)
            ticket.wait(None)  # answered now: by the withdrawal, or by its execution if that began first
        if ticket.error is not None:
            raise ticket.error
        return ticket.outputs

    def steps(self, inputs: Tensors, batch_size: int, deadline: float | None, scope: CallScope | None = None
              ) -> Steps:  # fmt: skip
        """One request as a `Steps` generator: one ticket to wait for, then its outputs."""
        trace = scope.trace if scope is not None else None
        (outputs,) = yield [(self, self.submit(inputs, batch_size, deadline, scope, trace))]
        return outputs

    def expire_if_queued(self, ticket: Ticket) -> None:
        """At the ticket's deadline: withdraw it if it is still queued."""
        self.withdraw(ticket, self._expired(ticket))

    def withdraw(self, ticket: Ticket, error: InferenceError) -> None:
        """Take a ticket out of the queue and answer it with `error`; a ticket already
        taken into a batch is left to its execution."""
        with self._lock:
            if not ticket.queued:
                return
            self._queue.remove(ticket)
            self._left_queue(ticket)
            self._stats.record_failure(time.monotonic_ns() - ticket.arrival_ns)
        ticket.answer(None, error)

    def _expired(self, ticket: Ticket) -> InferenceError:
        waited_ms = (time.monotonic_ns() - ticket.arrival_ns) / 1e6
        return InferenceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"deadline passed after {waited_ms:.1f} ms in the queue of model {self.name!r}; "
                              f"dropped before compute")

    # -- the instance threads --------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._execute(batch)

    def _next_batch(self) -> list[Ticket] | None:
        """The next batch to execute (None: closing). Waits for requests, and for a fuller
        batch up to max_queue_delay after the oldest one arrived."""
        with self._lock:
            while True:
                while not self._queue and not self._closed:
                    self._arrived.wait()
                if self._closed and not (self._draining and self._queue):
                    return None
                if self._gathers and self.policy.max_queue_delay_s > 0:
                    self._wait_for_fuller_batch()
                batch, expired = self._take_batch()
                for ticket in expired:
                    self._stats.record_failure(time.monotonic_ns() - ticket.arrival_ns)
                    ticket.answer(None, self._expired(ticket))
                if batch:
                    self._executing += len(batch)
                    self._peak = max(self._peak - 1, len(self._queue) + self._executing)
                    return batch

    def _wait_for_fuller_batch(self) -> None:
        while self._queue and self._queued_elements < self.policy.max_batch_size and not self._closed:
            if self.policy.adaptive_delay and len(self._queue) >= self._peak:
                return  # all that recent traffic could send is here
            waited = (time.monotonic_ns() - self._queue[0].arrival_ns) / 1e9
            remaining = self.policy.max_queue_delay_s - waited
            if remaining <= 0:
                return
            self._arrived.wait(remaining)

    def _take_batch(self) -> tuple[list[Ticket], list[Ticket]]:
        """(the batch, the expired tickets dropped on the way); called with the lock held."""
        now = time.monotonic()
        batch: list[Ticket] = []
        expired: list[Ticket] = []
        elements = 0
        while self._queue:
            ticket = self._queue[0]
            if ticket.deadline is not None and now >= ticket.deadline:
                expired.append(self._left_queue(self._queue.popleft()))
                continue
            if batch and elements + ticket.batch_size > self._batch_limit:
                break
            batch.append(self._left_queue(self._queue.popleft()))
            elements += ticket.batch_size
        return batch, expired

    def _left_queue(self, ticket: Ticket) -> Ticket:
        """Bookkeeping for a ticket just taken out of the queue (the lock is held)."""
        self._queued_elements -= ticket.batch_size
        ticket.queued = False
        return ticket

    def _execute(self, batch: list[Ticket]) -> None:
        started_ns = time.monotonic_ns()
        tracer = tracing.active
        span = None if tracer is None else tracer.start_batch(self.name, self.version, batch, started_ns,
                                                               sum(ticket.batch_size for ticket in batch))
        try:
            outputs, timings = self._compute(batch)
        except Exception as error:  # a failed execution must fail its requests, never the server
            log.exception("model %s version %s: execution failed", self.name, self.version)
            failure = InferenceError(grpc.StatusCode.INTERNAL, f"model {self.name!r} failed to execute: {error}")
            if span is not None:
                tracer.end_batch(span, failure)
            self._computed(batch)
            finished_ns = time.monotonic_ns()
            self._stats.record_failures([finished_ns - ticket.arrival_ns for ticket in batch])
            for ticket in batch:
                ticket.answer(None, failure)
            return
        if span is not None:  # ended before the answers go out: a trace's last span must not outlive its request
            tracer.end_batch(span, None)
        self._computed(batch)
        finished_ns = time.monotonic_ns()
        for ticket, ticket_outputs in zip(batch, outputs):
            ticket.answer(ticket_outputs)
        queued_ns = [started_ns - ticket.arrival_ns for ticket in batch]
        elements = sum(ticket.batch_size for ticket in batch)
        self._stats.record_batch(elements, timings, queued_ns, [finished_ns - ticket.arrival_ns for ticket in batch])
        self._metrics.record_batch(elements, sum(timings) / 1e9, queued_ns)

    def _computed(self, batch: list[Ticket]) -> None:
        """The batch stops counting as held before its answers go out: an answered client
        may send again at once, and must not be counted twice in the peak."""
        with self._lock:
            self._executing -= len(batch)

    def _compute(self, batch: list[Ticket]) -> tuple[list[Tensors], tuple[int, int, int]]:
        """Form the batch, run the model, split the results."""
        start = time.monotonic_ns()
        if len(batch) == 1:
            inputs = batch[0].inputs
        else:
            inputs = {name: np.concatenate([ticket.inputs[name] for ticket in batch]) for name in batch[0].inputs}
        formed = time.monotonic_ns()
        outputs = self._run(inputs)
        computed = time.monotonic_ns()
        if len(batch) == 1:
            split = [outputs]
        else:
            split, offset = [], 0
            for ticket in batch:
                end = offset + ticket.batch_size
                split.append({name: array[offset:end] for name, array in outputs.items()})
                offset = end
        done = time.monotonic_ns()
        return split, (formed - start, computed - formed, done - computed)

    def close(self, drain: bool = False) -> None:
        """Stop the instance threads after the executions under way. What is still queued
        is failed (shutdown), or with `drain` executed first (a retired model version:
        its queued requests are answered by it, not failed)."""
        with self._lock:
            self._closed = True
            self._draining = drain
            queued = [] if drain else [self._left_queue(ticket) for ticket in self._queue]
            if not drain:
                self._queue.clear()
            self._arrived.notify_all()
        for ticket in queued:
            ticket.answer(None, InferenceError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down"))
        for thread in self._threads:
            thread.join()
        self._threads.clear()

"""Dynamic batching: concurrent requests for one model version become one onnxruntime call.

The callers are coroutines on the server's event loop (gRPC and HTTP handlers). `submit`
puts a request in a bounded FIFO queue and returns its `Ticket`; `result` awaits its
answer. Each model instance (config.pbtxt instance_group count) is one thread that takes
batches from the queue, runs onnxruntime (which releases the GIL) and hands the answers
of the whole batch back to the loop in one call: one thread hop there and one back.

Batch forming follows Triton's rule: take requests from the front until the next one
would push the batch past max_batch_size; if fewer elements than that are queued, first
wait until enough arrive or the oldest request has waited max_queue_delay. While an
instance computes, new requests queue up, so under load batches form by themselves even
with a delay of 0.

- Full queue: the new request is refused at once with RESOURCE_EXHAUSTED.
- A request whose deadline passes while it is queued is dropped before compute; its
  caller gets DEADLINE_EXCEEDED at its deadline, also when its batch is computing then.
  A caller that goes away (client cancel) withdraws its request from the queue at once.
- A failed execution fails the requests of that batch with INTERNAL; the thread goes on.
- Without dynamic batching every request is its own execution, through the same queue.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import grpc
import numpy as np

from server.metrics import ModelMetrics
from server.request_codec import InferenceError, Tensors
from server.statistics import ModelStats

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class BatchingPolicy:
    max_batch_size: int  # 0: the model has no batch dimension
    max_queue_delay_s: float
    max_queue_size: int
    dynamic: bool  # gather several requests into one execution
    instances: int = 1  # executions that may run at the same time


class Ticket:
    """One request in a batcher: its inputs, and the future its answer goes to."""

    __slots__ = ("inputs", "batch_size", "deadline", "arrival_ns", "future", "queued")

    def __init__(self, inputs: Tensors, batch_size: int, deadline: float | None, future: asyncio.Future):
        self.inputs = inputs
        self.batch_size = batch_size
        self.deadline = deadline  # time.monotonic() seconds (the event loop's clock), or None
        self.arrival_ns = time.monotonic_ns()
        self.future = future
        self.queued = True  # set False, under the batcher's lock, when it leaves the queue


def _settle(tickets: list[Ticket], outputs: list[Tensors] | None, error: InferenceError | None) -> None:
    """On the event loop: answer tickets whose callers still wait."""
    for index, ticket in enumerate(tickets):
        if not ticket.future.done():
            if error is None:
                ticket.future.set_result(outputs[index])
            else:
                ticket.future.set_exception(error)


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
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gathers = policy.dynamic and policy.max_batch_size > 0
        self._batch_limit = policy.max_batch_size if self._gathers else 1
        metrics.pending.set_function(lambda: len(self._queue))

    def start(self) -> None:
        """Start the instance threads; answers go to the running event loop."""
        self._loop = asyncio.get_running_loop()
        for instance in range(self.policy.instances):
            thread = threading.Thread(target=self._serve, name=f"{self.name}-v{self.version}-{instance}", daemon=True)
            thread.start()
            self._threads.append(thread)

    # -- callers' side (on the event loop) --------------------------------------------------
    def submit(self, inputs: Tensors, batch_size: int, deadline: float | None) -> Ticket:
        ticket = Ticket(inputs, batch_size, deadline, self._loop.create_future())
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
            self._arrived.notify()
        return ticket

    async def result(self, ticket: Ticket) -> Tensors:
        """The ticket's outputs. At its deadline it is withdrawn and the caller gets
        DEADLINE_EXCEEDED, even when its batch is still computing (the answer is dropped)."""
        try:
            if ticket.deadline is None:
                return await ticket.future
            async with asyncio.timeout_at(ticket.deadline):
                return await ticket.future
        except TimeoutError:
            self.withdraw(ticket)
            raise self._expired(ticket) from None
        except asyncio.CancelledError:  # the caller went away: free its place in the queue now
            self.withdraw(ticket)
            raise

    async def infer(self, inputs: Tensors, batch_size: int, deadline: float | None) -> Tensors:
        return await self.result(self.submit(inputs, batch_size, deadline))

    def withdraw(self, ticket: Ticket) -> None:
        """Take a ticket out of the queue (counted as failed); one already taken into a
        batch, or answered, is left as it is."""
        with self._lock:
            if not ticket.queued:
                return
            self._queue.remove(ticket)
            self._queued_elements -= ticket.batch_size
            ticket.queued = False
        self._stats.record_failure(time.monotonic_ns() - ticket.arrival_ns)

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
                if self._closed:
                    return None
                if self._gathers and self.policy.max_queue_delay_s > 0:
                    self._wait_for_fuller_batch()
                batch, expired = self._take_batch()
                for ticket in expired:
                    self._stats.record_failure(time.monotonic_ns() - ticket.arrival_ns)
                    self._answer([ticket], None, self._expired(ticket))
                if batch:
                    return batch

    def _wait_for_fuller_batch(self) -> None:
        while self._queue and self._queued_elements < self.policy.max_batch_size and not self._closed:
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
                expired.append(self._queue.popleft())
                self._queued_elements -= ticket.batch_size
                ticket.queued = False
                continue
            if batch and elements + ticket.batch_size > self._batch_limit:
                break
            self._queue.popleft()
            self._queued_elements -= ticket.batch_size
            ticket.queued = False
            batch.append(ticket)
            elements += ticket.batch_size
        return batch, expired

    def _execute(self, batch: list[Ticket]) -> None:
        started_ns = time.monotonic_ns()
        try:
            outputs, timings = self._compute(batch)
        except Exception as error:  # a failed execution must fail its requests, never the server
            log.exception("model %s version %s: execution failed", self.name, self.version)
            failure = InferenceError(grpc.StatusCode.INTERNAL, f"model {self.name!r} failed to execute: {error}")
            finished_ns = time.monotonic_ns()
            self._stats.record_failures([finished_ns - ticket.arrival_ns for ticket in batch])
            self._answer(batch, None, failure)
            return
        finished_ns = time.monotonic_ns()
        self._answer(batch, outputs, None)
        queued_ns = [started_ns - ticket.arrival_ns for ticket in batch]
        elements = sum(ticket.batch_size for ticket in batch)
        self._stats.record_batch(elements, timings, queued_ns, [finished_ns - ticket.arrival_ns for ticket in batch])
        self._metrics.record_batch(elements, sum(timings) / 1e9, queued_ns)

    def _answer(self, tickets: list[Ticket], outputs: list[Tensors] | None, error: InferenceError | None) -> None:
        """From an instance thread: settle the tickets on the event loop, in one hop."""
        self._loop.call_soon_threadsafe(_settle, tickets, outputs, error)

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

    def close(self) -> None:
        """Stop the instance threads after the executions under way; fail what is still queued.
        Blocks until the threads have ended: call it from a worker thread, not the loop."""
        with self._lock:
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            self._queued_elements = 0
            for ticket in queued:
                ticket.queued = False
            self._arrived.notify_all()
        if queued:
            self._answer(queued, None, InferenceError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down"))
        for thread in self._threads:
            thread.join()

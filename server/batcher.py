"""Dynamic batching: concurrent requests for one model version become one onnxruntime call.

Requests wait in a bounded FIFO queue. When a model instance is free, the batcher
takes requests from the front until the next one would push the batch past
max_batch_size; if the queue holds fewer elements than that, it first waits until
either enough arrive or the oldest request has waited max_queue_delay (Triton's
rule). While an instance computes, new requests queue up, so under load batches
form by themselves even with a delay of 0.

- Full queue: the new request is refused at once with RESOURCE_EXHAUSTED.
- A request whose deadline has passed (or whose client went away) when its batch is
  formed is dropped before compute; its caller gets DEADLINE_EXCEEDED.
- Compute runs in a thread pool with one thread per model instance (config.pbtxt
  instance_group count), so the gRPC event loop never blocks: the worker forms the
  batch (one np.concatenate per input), runs onnxruntime (which releases the GIL) and
  slices the outputs back into per-request views.
- Without dynamic batching every request is its own execution, through the same queue.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import grpc
import numpy as np

from server.metrics import ModelMetrics
from server.protocol import InferenceError
from server.statistics import ModelStats

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class BatchingPolicy:
    max_batch_size: int  # 0: the model has no batch dimension
    max_queue_delay_s: float
    max_queue_size: int
    dynamic: bool  # gather several requests into one execution
    instances: int = 1  # executions that may run at the same time


@dataclass(slots=True, eq=False)  # identity equality: deque.remove must find this very request
class _Request:
    inputs: Tensors
    batch_size: int
    deadline: float | None  # time.monotonic() seconds
    arrival_ns: int  # time.monotonic_ns()
    future: asyncio.Future


class DynamicBatcher:
    """The scheduler of one ONNX model version. `infer` is what the servicer awaits."""

    def __init__(self, name: str, version: str, run: Callable[[Tensors], Tensors], policy: BatchingPolicy,
                 stats: ModelStats, metrics: ModelMetrics):  # fmt: skip
        self.name = name
        self.version = version
        self.policy = policy
        self._run = run
        self._stats = stats
        self._metrics = metrics
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_elements = 0
        self._arrived = asyncio.Event()
        self._free_instances = asyncio.Semaphore(policy.instances)
        self._executing: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(policy.instances, thread_name_prefix=f"{name}-v{version}")
        self._loop_task: asyncio.Task | None = None
        self._gathers = policy.dynamic and policy.max_batch_size > 0
        self._batch_limit = policy.max_batch_size if self._gathers else 1

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._schedule(), name=f"batcher {self.name} v{self.version}")

    async def infer(self, inputs: Tensors, batch_size: int, deadline: float | None) -> Tensors:
        if len(self._queue) >= self.policy.max_queue_size:
            self._stats.record_failure(0)
            raise InferenceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"model {self.name!r} is overloaded: its queue holds {len(self._queue)} "
                                 f"requests (max_queue_size {self.policy.max_queue_size}); retry later")
        future = asyncio.get_running_loop().create_future()
        request = _Request(inputs, batch_size, deadline, time.monotonic_ns(), future)
        self._queue.append(request)
        self._queued_elements += batch_size
        self._metrics.pending.inc()
        self._arrived.set()
        try:
            return await future
        except asyncio.CancelledError:
            # The caller went away (client cancelled, or its deadline passed): free its
            # place in the queue now rather than when its batch would have formed.
            self._forget(request)
            raise

    def _forget(self, request: _Request) -> None:
        try:
            self._queue.remove(request)
        except ValueError:
            return  # already taken into a batch
        self._queued_elements -= request.batch_size
        self._metrics.pending.dec()
        self._stats.record_failure(time.monotonic_ns() - request.arrival_ns)

    async def _schedule(self) -> None:
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._free_instances.acquire()
            if self._gathers and self.policy.max_queue_delay_s > 0:
                await self._wait_for_fuller_batch()
            batch = self._take_batch()
            if not batch:
                self._free_instances.release()
                continue
            task = asyncio.create_task(self._execute(batch))
            self._executing.add(task)
            task.add_done_callback(self._executing.discard)

    async def _wait_for_fuller_batch(self) -> None:
        """Wait until max_batch_size elements are queued or the oldest request has
        waited max_queue_delay, whichever comes first."""
        while self._queue and self._queued_elements < self.policy.max_batch_size:
            waited = (time.monotonic_ns() - self._queue[0].arrival_ns) / 1e9
            remaining = self.policy.max_queue_delay_s - waited
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                return

    def _dequeue(self) -> _Request:
        request = self._queue.popleft()
        self._queued_elements -= request.batch_size
        self._metrics.pending.dec()
        return request

    def _take_batch(self) -> list[_Request]:
        now = time.monotonic()
        batch: list[_Request] = []
        elements = 0
        while self._queue:
            request = self._queue[0]
            if request.future.done():  # cancelled; its caller removes it (see infer) on its next turn
                self._dequeue()
                self._stats.record_failure(time.monotonic_ns() - request.arrival_ns)
                continue
            if request.deadline is not None and now >= request.deadline:
                self._dequeue()
                self._stats.record_failure(time.monotonic_ns() - request.arrival_ns)
                request.future.set_exception(InferenceError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"deadline passed after {(time.monotonic_ns() - request.arrival_ns) / 1e6:.1f} ms in the "
                    f"queue of model {self.name!r}; dropped before compute"))
                continue
            if batch and elements + request.batch_size > self._batch_limit:
                break
            batch.append(self._dequeue())
            elements += request.batch_size
        return batch

    async def _execute(self, batch: list[_Request]) -> None:
        started_ns = time.monotonic_ns()
        for request in batch:
            queued_ns = started_ns - request.arrival_ns
            self._stats.queue.add(queued_ns)
            self._metrics.queue_duration.observe(queued_ns / 1e9)
        try:
            outputs, timings = await asyncio.get_running_loop().run_in_executor(self._executor, self._compute, batch)
        except Exception as error:  # a failed execution must fail its requests, never the server
            log.exception("model %s version %s: execution failed", self.name, self.version)
            for request in batch:
                self._stats.record_failure(time.monotonic_ns() - request.arrival_ns)
                if not request.future.done():
                    request.future.set_exception(InferenceError(
                        grpc.StatusCode.INTERNAL, f"model {self.name!r} failed to execute: {error}"))
            return
        finally:
            self._free_instances.release()
        elements = sum(request.batch_size for request in batch)
        self._stats.record_execution(elements, *timings, requests=len(batch))
        self._metrics.executions.inc()
        self._metrics.batch_size.observe(elements)
        self._metrics.compute_duration.observe(sum(timings) / 1e9)
        finished_ns = time.monotonic_ns()
        for request, request_outputs in zip(batch, outputs):
            if not request.future.done():
                request.future.set_result(request_outputs)
                self._stats.record_success(finished_ns - request.arrival_ns)

    def _compute(self, batch: list[_Request]) -> tuple[list[Tensors], tuple[int, int, int]]:
        """Runs in a worker thread: form the batch, run the model, split the results."""
        start = time.monotonic_ns()
        if len(batch) == 1:
            inputs = batch[0].inputs
        else:
            inputs = {name: np.concatenate([request.inputs[name] for request in batch]) for name in batch[0].inputs}
        formed = time.monotonic_ns()
        outputs = self._run(inputs)
        computed = time.monotonic_ns()
        if len(batch) == 1:
            split = [outputs]
        else:
            split, offset = [], 0
            for request in batch:
                end = offset + request.batch_size
                split.append({name: array[offset:end] for name, array in outputs.items()})
                offset = end
        done = time.monotonic_ns()
        return split, (formed - start, computed - formed, done - computed)

    async def close(self) -> None:
        """Stop scheduling; fail what is still queued; wait for executions under way."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        while self._queue:
            request = self._dequeue()
            if not request.future.done():
                request.future.set_exception(InferenceError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down"))
        await asyncio.gather(*self._executing, return_exceptions=True)
        self._executor.shutdown(wait=True)

"""How one request travels through its model's batchers, on a thread or on an event loop.

A scheduler (a model's `DynamicBatcher`, or an `EnsembleScheduler` over its members'
batchers) describes a request as a `Steps` generator: it submits tickets to batchers and
yields them, is sent their outputs once they are answered, and finally returns the
request's outputs. Two drivers wait for the yielded tickets:

  run_blocking  on the calling thread (gRPC's worker threads): each ticket's lock;
  run_async     on an event loop (the HTTP endpoint): the batcher's instance thread wakes
                the loop when it answers, so no thread waits per request.

Either way the batchers, their queues and their batches are the same: a gRPC and an HTTP
request for one model can share one execution.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol

import grpc

from server.errors import InferenceError
from server.scheduling.batcher import CallScope, DynamicBatcher, Steps, Tensors, Ticket


class Scheduler(Protocol):
    """What the transports call: a DynamicBatcher or an EnsembleScheduler."""

    def steps(self, inputs: Tensors, batch_size: int, deadline: float | None,
              scope: CallScope | None = None) -> Steps: ...  # fmt: skip

    def close(self) -> None: ...


def run_blocking(steps: Steps) -> Tensors:
    """Drive `steps` on this thread, blocking on each ticket until it is answered."""
    with contextlib.closing(steps):  # an abandoned run still releases what it holds
        waiting, outputs = _advance(steps, None, None)
        while waiting is not None:
            waiting, outputs = _advance(steps, *_collect(waiting))
        return outputs


async def run_async(steps: Steps) -> Tensors:
    """Drive `steps` on the running event loop, which the answering threads wake."""
    with contextlib.closing(steps):  # a cancelled task still releases what it holds
        waiting, outputs = _advance(steps, None, None)
        while waiting is not None:
            for batcher, ticket in waiting:
                await _answered(batcher, ticket)
            waiting, outputs = _advance(steps, *_collect(waiting))
        return outputs


def _advance(steps: Steps, answers: list[Tensors] | None, error: InferenceError | None):
    """Send `answers` into `steps` (or throw `error` there): (the tickets it waits for next,
    None), or (None, the request's outputs) once it is done."""
    try:
        return (steps.throw(error) if error is not None else steps.send(answers)), None
    except StopIteration as done:
        return None, done.value


def _collect(waiting: list[tuple[DynamicBatcher, Ticket]]) -> tuple[list[Tensors] | None, InferenceError | None]:
    """(the tickets' outputs, None), or (None, the first error); blocks until each is answered."""
    try:
        return [batcher.result(ticket) for batcher, ticket in waiting], None
    except InferenceError as failure:
        return None, failure


async def _answered(batcher: DynamicBatcher, ticket: Ticket) -> None:
    """Returns once the ticket is answered; at its deadline it is withdrawn if still queued,
    and a cancelled task withdraws it too."""
    if ticket.answered:
        return
    loop = asyncio.get_running_loop()
    answered = loop.create_future()
    ticket.on_answer = lambda: loop.call_soon_threadsafe(_resolve, answered)
    # Ticket.answer reads on_answer after marking the ticket answered: an answer that came
    # before the line above is seen here, and one that comes after calls it.
    if not ticket.answered:
        await _wait(batcher, ticket, answered, loop)


async def _wait(batcher: DynamicBatcher, ticket: Ticket, answered: asyncio.Future,
                loop: asyncio.AbstractEventLoop) -> None:  # fmt: skip
    timer = None
    if ticket.deadline is not None:
        timer = loop.call_later(max(ticket.deadline - time.monotonic(), 0.0), batcher.expire_if_queued, ticket)
    try:
        await answered
    except asyncio.CancelledError:
        batcher.withdraw(ticket, InferenceError(grpc.StatusCode.CANCELLED, "the call ended before its answer"))
        raise
    finally:
        if timer is not None:
            timer.cancel()


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)

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
from collections.abc import Generator
from typing import TYPE_CHECKING, Protocol

import grpc

from server.request_codec import InferenceError, Tensors

if TYPE_CHECKING:
    from server.batcher import CallScope, DynamicBatcher, Ticket

# Yields the (batcher, ticket) pairs to wait for; is sent their outputs, in that order.
Steps = Generator[list[tuple["DynamicBatcher", "Ticket"]], list[Tensors], Tensors]


class Scheduler(Protocol):
    """What the transports call: a DynamicBatcher or an EnsembleScheduler."""

    def steps(self, inputs: Tensors, batch_size: int, deadline: float | None,
              scope: CallScope | None = None) -> Steps: ...  # fmt: skip

    def close(self) -> None: ...


def run_blocking(steps: Steps) -> Tensors:
    """Drive `steps` on this thread, blocking on each ticket until it is answered."""
    answers: list[Tensors] | None = None
    error: InferenceError | None = None
    with contextlib.closing(steps):  # an abandoned run still releases what it holds
        while True:
            try:
                waiting = steps.throw(error) if error is not None else steps.send(answers)
            except StopIteration as done:
                return done.value
            try:
                answers, error = [batcher.result(ticket) for batcher, ticket in waiting], None
            except InferenceError as failure:
                answers, error = None, failure


async def run_async(steps: Steps) -> Tensors:
    """Drive `steps` on the running event loop, which the answering threads wake."""
    answers: list[Tensors] | None = None
    error: InferenceError | None = None
    with contextlib.closing(steps):  # a cancelled task still releases what it holds
        while True:
            try:
                waiting = steps.throw(error) if error is not None else steps.send(answers)
            except StopIteration as done:
                return done.value
            try:
                answers, error = [await _answer(batcher, ticket) for batcher, ticket in waiting], None
            except InferenceError as failure:
                answers, error = None, failure


async def _answer(batcher: DynamicBatcher, ticket: Ticket) -> Tensors:
    """The ticket's outputs (or its error raised) once answered; at its deadline it is
    withdrawn if still queued, and a cancelled task withdraws it too."""
    if not ticket.answered:
        loop = asyncio.get_running_loop()
        answered = loop.create_future()
        ticket.on_answer = lambda: loop.call_soon_threadsafe(_resolve, answered)
        # Ticket.answer reads on_answer after marking the ticket answered: an answer that came
        # before the line above is seen here, and one that comes after calls it.
        if not ticket.answered:
            await _wait(batcher, ticket, answered, loop)
    return batcher.result(ticket)  # answered: returns (or raises) at once


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

"""gRPC's thread-pool server in front of the asyncio servicer.

Why not grpc.aio: through grpcio 1.85, every grpc.aio call that ends by its deadline or by
cancellation leaks the op array of a failed batch, about 80 bytes per call
(grpc/grpc#43360). Under load with many expiring deadlines that is steady, unbounded
growth: `benchmarks/bare_grpc_server.py` grew 20.4 % in 75 s of expired-only requests on
grpc.aio and 2.5 % on the thread-pool server.

So gRPC runs here on worker threads, and the servicer, the batchers and onnxruntime stay
on the server's asyncio loop: each call's worker thread submits the servicer coroutine to
the loop and waits for it. A call that ends early (client cancel, deadline) cancels its
coroutine, exactly as grpc.aio did, so the batcher drops it before compute.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import grpc


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class LoopContext:
    """What the servicer coroutines use of a grpc.aio ServicerContext, over a thread-pool one."""

    def __init__(self, context: grpc.ServicerContext):
        self._context = context

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise _Abort(code, details)

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()


def _unary_bridge(coroutine_function, loop: asyncio.AbstractEventLoop):
    """A thread-pool handler that runs `coroutine_function(request, context)` on `loop`."""

    def handle(request, context: grpc.ServicerContext):
        future = asyncio.run_coroutine_threadsafe(coroutine_function(request, LoopContext(context)), loop)
        # Runs when the call ends for any reason; cancelling a finished future does nothing.
        context.add_callback(future.cancel)
        try:
            return future.result()
        except _Abort as abort:
            context.abort(abort.code, abort.details)
        except concurrent.futures.CancelledError:
            # The call is over (cancelled or past its deadline): gRPC has answered it.
            context.abort(grpc.StatusCode.CANCELLED, "the call ended before its answer was ready")

    return handle


class ThreadedServicer:
    """Every unary RPC of `servicer` (an asyncio servicer object) as a thread-pool handler."""

    def __init__(self, servicer, loop: asyncio.AbstractEventLoop):
        self._servicer, self._loop = servicer, loop

    def __getattr__(self, name: str):
        method = getattr(self._servicer, name)
        if not asyncio.iscoroutinefunction(method):
            raise AttributeError(name)
        return _unary_bridge(method, self._loop)

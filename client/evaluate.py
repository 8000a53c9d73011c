"""Stream a data set through a served model and gather its probabilities.

Batches go out as futures (`Transport.submit_infer`: gRPC's own, or a thread per request
in flight over HTTP) with at most `concurrency` requests in flight (a semaphore released
by each response), so the server's dynamic batcher sees a steady queue while the client
holds only a bounded number of requests. Each request's
latency is measured client-side, from send to response, for the percentiles.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from client.transport import ClientError, ImageModel, Transport


@dataclass(frozen=True)
class StreamResult:
    probabilities: np.ndarray  # float32 [N, num_classes], in dataset order
    latencies_s: np.ndarray  # one per request
    wall_time_s: float  # first send to last response
    batch_size: int
    concurrency: int


def check_dataset_fits(model: ImageModel, images: np.ndarray, class_names: list[str], dataset_label: str) -> None:
    """Explain, naming both shapes, when the data set's images or classes do not fit the model."""
    image_shape = tuple(images.shape[1:])
    wanted = model.image_shape
    fits = len(image_shape) == 3 and all(w in (-1, got) for w, got in zip(wanted, image_shape))
    if not fits:
        raise ClientError(
            f"shape mismatch: model {model.name!r} takes {model.image_input.name} "
            f"{model.image_input.datatype} {list(model.image_input.shape)} (H, W, C = {_hwc(wanted)}) "
            f"but {dataset_label} images are {list(images.shape)} (H, W, C = {_hwc(image_shape)}); "
            "evaluate the model on the data set it was trained for"
        )
    if model.num_classes not in (-1, len(class_names)):
        raise ClientError(
            f"class mismatch: model {model.name!r} output {model.probabilities_output.describe()} scores "
            f"{model.num_classes} classes but {dataset_label} has {len(class_names)}"
        )


def effective_batch_size(model: ImageModel, requested: int) -> int:
    """The batch size actually sent: capped at the model's max_batch_size, 1 without a batch dimension."""
    if not model.batched:
        return 1
    if model.max_batch_size > 0:
        return min(requested, model.max_batch_size)
    return requested


def _hwc(shape: tuple[int, ...]) -> str:
    return "x".join("?" if d == -1 else str(d) for d in shape)


def stream_probabilities(
    connection: Transport,
    model: ImageModel,
    images: np.ndarray,
    batch_size: int = 64,
    concurrency: int = 4,
    on_progress: Callable[[int], None] | None = None,
) -> StreamResult:
    """Send `images` in batches; return probabilities [N, C] in the order of `images`.

    Each request waits up to the connection's timeout_s.
    """
    if batch_size < 1 or concurrency < 1:
        raise ClientError(f"--batch-size and --concurrency must be >= 1, got {batch_size} and {concurrency}")
    batch_size = effective_batch_size(model, batch_size)
    gatherer = _Gatherer(concurrency, on_progress)
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        if not gatherer.wait_for_slot():
            break  # a request failed: stop sending, report that failure
        batch = images[start : start + batch_size]
        gatherer.send(connection.submit_infer(model, batch), start, len(batch))
    gatherer.wait_for_all()
    wall_time_s = time.perf_counter() - started
    if gatherer.failure is not None:
        raise gatherer.client_error(connection.url, model.name)
    probabilities = np.concatenate(gatherer.ordered_outputs(), axis=0)
    if probabilities.shape[0] != len(images):
        raise ClientError(f"model {model.name!r} returned {probabilities.shape[0]} rows for {len(images)} images")
    return StreamResult(
        probabilities=probabilities.astype(np.float32, copy=False),
        latencies_s=np.asarray(gatherer.latencies_s),
        wall_time_s=wall_time_s,
        batch_size=batch_size,
        concurrency=concurrency,
    )


class _Gatherer:
    """Bookkeeping for in-flight requests: a slot semaphore, outputs by offset, the first failure."""

    def __init__(self, concurrency: int, on_progress):
        self.slots = threading.Semaphore(concurrency)
        self.concurrency = concurrency
        self.on_progress = on_progress
        self.lock = threading.Lock()
        self.outputs: dict[int, np.ndarray] = {}
        self.latencies_s: list[float] = []
        self.failure: BaseException | None = None

    def wait_for_slot(self) -> bool:
        self.slots.acquire()
        if self.failure is not None:
            self.slots.release()
            return False
        return True

    def send(self, future: concurrent.futures.Future, start: int, count: int) -> None:
        sent_at = time.perf_counter()
        future.add_done_callback(lambda done: self._on_done(done, start, count, sent_at))

    def _on_done(self, future: concurrent.futures.Future, start: int, count: int, sent_at: float) -> None:
        latency_s = time.perf_counter() - sent_at
        try:
            scores = future.result()
            scores = scores.reshape(count, -1)  # a non-batching model answers [C] for its one image
            with self.lock:
                self.outputs[start] = scores
                self.latencies_s.append(latency_s)
            if self.on_progress is not None:
                self.on_progress(count)
        except Exception as error:  # a callback must not raise: the future would log it and lose it
            with self.lock:
                if self.failure is None:
                    self.failure = error
        finally:
            self.slots.release()

    def wait_for_all(self) -> None:
        """Every slot free again means every request sent has finished."""
        for _ in range(self.concurrency):
            self.slots.acquire()
        for _ in range(self.concurrency):
            self.slots.release()

    def ordered_outputs(self) -> list[np.ndarray]:
        return [self.outputs[start] for start in sorted(self.outputs)]

    def client_error(self, url: str, model_name: str) -> ClientError:
        error = self.failure
        if isinstance(error, ClientError):
            return error  # the transport's own one-line message
        return ClientError(f"inference on model {model_name!r} at {url} returned an unreadable response: {error}")

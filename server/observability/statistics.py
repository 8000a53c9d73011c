"""Per-model-version counters in Triton's ModelStatistics semantics.

- inference_count: successful inferences, counting every element of every batch;
- execution_count: model executions (with dynamic batching several requests share one);
- inference_stats: success / fail (count and total ns of the whole request), queue
  (time from arrival to the start of its execution), compute_input (forming the batch),
  compute_infer (onnxruntime), compute_output (splitting the results);
- batch_stats: per batch size formed, how many executions and their compute times.

Updates come from the gRPC worker threads and the batchers' instance threads, so every
update takes the stats' lock; a batch is recorded in one go, under one acquisition.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from ensemble_serving.protocol import grpc_service_pb2 as pb


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def to_proto(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)


@dataclass
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStats:
    name: str
    version: str
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStats] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record_failure(self, duration_ns: int) -> None:
        with self._lock:
            self.fail.add(duration_ns)

    def record_failures(self, durations_ns: list[int]) -> None:
        with self._lock:
            self.fail.add(sum(durations_ns), len(durations_ns))

    def record_batch(self, batch_size: int, timings_ns: tuple[int, int, int], queued_ns: list[int],
                     durations_ns: list[int]) -> None:  # fmt: skip
        """One model execution over `batch_size` elements gathered from len(queued_ns) requests,
        each of which waited queued_ns and took durations_ns from arrival to its answer.
        Triton counts compute times once per request in inference_stats, once per
        execution in batch_stats."""
        requests = len(queued_ns)
        input_ns, infer_ns, output_ns = timings_ns
        with self._lock:
            self.execution_count += 1
            self.inference_count += batch_size
            self.queue.add(sum(queued_ns), requests)
            self.compute_input.add(input_ns * requests, requests)
            self.compute_infer.add(infer_ns * requests, requests)
            self.compute_output.add(output_ns * requests, requests)
            self.success.add(sum(durations_ns), requests)
            self.last_inference_ms = time.time_ns() // 1_000_000
            batch = self.batches.get(batch_size)
            if batch is None:
                batch = self.batches[batch_size] = BatchStats()
            batch.compute_input.add(input_ns)
            batch.compute_infer.add(infer_ns)
            batch.compute_output.add(output_ns)

    def to_proto(self) -> pb.ModelStatistics:
        with self._lock:
            return self._to_proto()

    def _to_proto(self) -> pb.ModelStatistics:
        return pb.ModelStatistics(
            name=self.name,
            version=self.version,
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            inference_stats=pb.InferStatistics(
                success=self.success.to_proto(), fail=self.fail.to_proto(), queue=self.queue.to_proto(),
                compute_input=self.compute_input.to_proto(), compute_infer=self.compute_infer.to_proto(),
                compute_output=self.compute_output.to_proto(),
            ),
            batch_stats=[
                pb.InferBatchStatistics(batch_size=size, compute_input=stats.compute_input.to_proto(),
                                        compute_infer=stats.compute_infer.to_proto(),
                                        compute_output=stats.compute_output.to_proto())
                for size, stats in sorted(self.batches.items())
            ],
        )


_INFER_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
_BATCH_DURATIONS = ("compute_input", "compute_infer", "compute_output")


def merge_statistics(stats: list[pb.ModelStatistics]) -> list[pb.ModelStatistics]:
    """The statistics of several worker processes as one server's: per model version,
    counts and times summed, batch_stats summed per batch size, the latest last_inference.
    Versions keep the order of their first appearance."""
    merged: dict[tuple[str, str], pb.ModelStatistics] = {}
    for part in stats:
        total = merged.get((part.name, part.version))
        if total is None:
            merged[part.name, part.version] = total = pb.ModelStatistics(name=part.name, version=part.version)
        total.last_inference = max(total.last_inference, part.last_inference)
        total.inference_count += part.inference_count
        total.execution_count += part.execution_count
        _add_durations(total.inference_stats, part.inference_stats, _INFER_DURATIONS)
        batches = {batch.batch_size: batch for batch in total.batch_stats}
        for batch in part.batch_stats:
            if batch.batch_size not in batches:
                batches[batch.batch_size] = total.batch_stats.add(batch_size=batch.batch_size)
            _add_durations(batches[batch.batch_size], batch, _BATCH_DURATIONS)
    for total in merged.values():
        total.batch_stats.sort(key=lambda batch: batch.batch_size)
    return list(merged.values())


def _add_durations(total, part, names: tuple[str, ...]) -> None:
    for name in names:
        into, add = getattr(total, name), getattr(part, name)
        into.count += add.count
        into.ns += add.ns

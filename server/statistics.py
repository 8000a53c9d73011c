"""Per-model-version counters in Triton's ModelStatistics semantics.

- inference_count: successful inferences, counting every element of every batch;
- execution_count: model executions (with dynamic batching several requests share one);
- inference_stats: success / fail (count and total ns of the whole request), queue
  (time from arrival to the start of its execution), compute_input (forming the batch),
  compute_infer (onnxruntime), compute_output (splitting the results);
- batch_stats: per batch size formed, how many executions and their compute times.

All updates happen on the event loop thread, so no locks are needed.
"""

from __future__ import annotations

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

    def record_success(self, duration_ns: int) -> None:
        self.success.add(duration_ns)
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_failure(self, duration_ns: int) -> None:
        self.fail.add(duration_ns)

    def record_execution(self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int, requests: int) -> None:
        """One model execution over `batch_size` elements gathered from `requests` requests.
        Triton counts compute times once per request in inference_stats, once per
        execution in batch_stats."""
        self.execution_count += 1
        self.inference_count += batch_size
        self.compute_input.add(input_ns * requests, requests)
        self.compute_infer.add(infer_ns * requests, requests)
        self.compute_output.add(output_ns * requests, requests)
        batch = self.batches.setdefault(batch_size, BatchStats())
        batch.compute_input.add(input_ns)
        batch.compute_infer.add(infer_ns)
        batch.compute_output.add(output_ns)

    def to_proto(self) -> pb.ModelStatistics:
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

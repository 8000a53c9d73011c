"""A bare gRPC server (grpc.aio unless told otherwise) to compare with ours: memory under
benchmarks/soak.py, and the ceiling of each Python gRPC stack under perf_analyzer.

Its ModelInfer sleeps 0-10 ms and answers a fixed function of the pixels; no batcher, no
onnxruntime, none of our code. Soaking both with requests whose deadlines expire in
flight shows whether memory growth is ours or grpcio's:

    python benchmarks/bare_grpc_server.py 28731 28732 &
    python benchmarks/soak.py --url 127.0.0.1:28731 --pid $! \
        --metrics-url http://127.0.0.1:28732/metrics --model tiny --mix expired=1 --duration 120

(grpcio 1.85 on grpc.aio: roughly 80 bytes per expired request; grpc/grpc#43360.)

`--no-sleep` answers at once: the ceiling of each transport with none of our code, for
perf_analyzer (`-m bare`; it also answers ServerMetadata, ModelReady and ModelConfig).
At concurrency 16 on the project's 2-core machine, in an earlier sitting (2026-12-02),
about 3,800 req/s on the thread-pool server and 6,300 on grpc.aio.

`--sync` serves the same answers from grpc's thread-pool server instead of grpc.aio, as
our server now does: 75 s of expired-only load grew it 2.5 % (244 k requests) against
20.4 % (303 k requests) on grpc.aio.

`--grpclib` serves them from grpclib (`pip install grpclib`: gRPC in pure Python on h2
and asyncio, with no native call objects to leak), the gRPC server for Python outside grpcio.
Ceilings measured in one sitting (2026-12-03, `--no-sleep`, perf_analyzer at c=16, 5 s
windows; Triton served the MNIST member at 5,576 req/s that hour): thread-pool 2,912
req/s, grpc.aio 4,848, grpclib 3,837 (3,864 with `--uvloop`).
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from prometheus_client import Gauge, start_http_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ensemble_serving.protocol import grpc_service_pb2 as pb  # noqa: E402
from ensemble_serving.protocol import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from ensemble_serving.protocol import model_config_pb2  # noqa: E402

IMAGE_SHAPE = [8, 8, 3]
CLASSES = 10


MAX_DELAY_S = 0.0 if "--no-sleep" in sys.argv else 0.01


class BareServicer(pb_grpc.GRPCInferenceServiceServicer):
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="bare", version="0")

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request, context):
        return metadata(request)

    async def ModelConfig(self, request, context):
        return config(request)

    async def ModelInfer(self, request, context):
        if MAX_DELAY_S:
            await asyncio.sleep(random.uniform(0, MAX_DELAY_S))
        return answer(request)


class BareSyncServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The same answers from grpc's thread-pool server."""

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="bare", version="0")

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=True)

    def ModelMetadata(self, request, context):
        return metadata(request)

    def ModelConfig(self, request, context):
        return config(request)

    def ModelInfer(self, request, context):
        if MAX_DELAY_S:
            time.sleep(random.uniform(0, MAX_DELAY_S))
        return answer(request)


def metadata(request):
    images = pb.ModelMetadataResponse.TensorMetadata(name="images", datatype="UINT8", shape=[-1, *IMAGE_SHAPE])
    scores = pb.ModelMetadataResponse.TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, CLASSES])
    return pb.ModelMetadataResponse(name=request.name, versions=["1"], platform="onnxruntime_onnx",
                                    inputs=[images], outputs=[scores])


def config(request):
    model = model_config_pb2.ModelConfig(name=request.name, platform="onnxruntime_onnx", max_batch_size=64)
    model.input.add(name="images", data_type=model_config_pb2.TYPE_UINT8, dims=IMAGE_SHAPE)
    model.output.add(name="probabilities", data_type=model_config_pb2.TYPE_FP32, dims=[CLASSES])
    return pb.ModelConfigResponse(config=model)


def answer(request):
    batch = request.inputs[0].shape[0]
    pixels = np.frombuffer(request.raw_input_contents[0], np.uint8).reshape(batch, -1)
    response = pb.ModelInferResponse(model_name=request.model_name)
    response.outputs.add(name="probabilities", datatype="FP32", shape=[batch, CLASSES])
    response.raw_output_contents.append((pixels[:, :CLASSES].astype("<f4") / 255).tobytes())
    return response


def start_metrics(metrics_port: int) -> None:
    # soak.py checks this gauge at the end; a server without a queue has nothing pending.
    Gauge("ensemble_server_pending_requests", "Always 0: no queue.", ["model"]).labels(model="any").set(0)
    start_http_server(metrics_port, addr="127.0.0.1")


class BareGrpclibServicer:
    """The same answers from grpclib, which routes calls by this mapping."""

    def __mapping__(self):
        from grpclib.const import Cardinality, Handler

        def unary(answer_for, request_type, response_type):
            async def handle(stream):
                await stream.send_message(answer_for(await stream.recv_message()))
            return Handler(handle, Cardinality.UNARY_UNARY, request_type, response_type)

        methods = {
            "ServerReady": unary(lambda r: pb.ServerReadyResponse(ready=True), pb.ServerReadyRequest,
                                 pb.ServerReadyResponse),
            "ServerMetadata": unary(lambda r: pb.ServerMetadataResponse(name="bare", version="0"),
                                    pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            "ModelReady": unary(lambda r: pb.ModelReadyResponse(ready=True), pb.ModelReadyRequest,
                                pb.ModelReadyResponse),
            "ModelMetadata": unary(metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ModelConfig": unary(config, pb.ModelConfigRequest, pb.ModelConfigResponse),
        }

        async def infer(stream):
            request = await stream.recv_message()
            if MAX_DELAY_S:
                await asyncio.sleep(random.uniform(0, MAX_DELAY_S))
            await stream.send_message(answer(request))

        methods["ModelInfer"] = Handler(infer, Cardinality.UNARY_UNARY, pb.ModelInferRequest, pb.ModelInferResponse)
        return {f"/inference.GRPCInferenceService/{name}": handler for name, handler in methods.items()}


async def serve_grpclib(grpc_port: int, metrics_port: int) -> None:
    from grpclib.server import Server

    start_metrics(metrics_port)
    server = Server([BareGrpclibServicer()])
    await server.start("127.0.0.1", grpc_port)
    await server.wait_closed()


def serve_sync(grpc_port: int, metrics_port: int) -> None:
    start_metrics(metrics_port)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(BareSyncServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    server.start()
    server.wait_for_termination()


async def serve(grpc_port: int, metrics_port: int) -> None:
    start_metrics(metrics_port)
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(BareServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    ports = [int(arg) for arg in sys.argv[1:] if not arg.startswith("--")]
    if "--sync" in sys.argv:
        serve_sync(*ports)
    elif "--grpclib" in sys.argv:
        if "--uvloop" in sys.argv:
            import uvloop

            uvloop.run(serve_grpclib(*ports))
        else:
            asyncio.run(serve_grpclib(*ports))
    else:
        asyncio.run(serve(*ports))

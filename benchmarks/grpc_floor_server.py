"""The floor of a Python gRPC inference server on this machine, for benchmarks/peer_bench.py.

    python -m benchmarks.grpc_floor_server REPOSITORY PORT

A bare `grpc.aio` server on uvloop, like genserve's and MLServer's, speaking the Open Inference Protocol:
ServerLive and ServerReady, ModelReady, and ModelInfer on `<model>.decoder`, which answers zeros of
the decoder's output shape (from the repository's manifests) for the request's row count. No model
runs, and there is no interceptor, validation, batching, metrics or logging: what an RPC of that
size costs in grpcio alone, the part of a server's time that no change to its own code can remove.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import grpc
import numpy as np

from genserve.export import Repository
from genserve.serving.protos import grpc_service_pb2 as pb
from genserve.serving.protos import grpc_service_pb2_grpc


class FloorService(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: Path):
        repo = Repository(repository)
        self.outputs: dict[str, tuple[str, list[int]]] = {}  # "<model>.decoder" -> (output name, row shape)
        for model in repo.models():
            parts = repo.load_manifest(model, max(repo.versions(model))).parts
            if "decoder" in parts:
                tensor = parts["decoder"].outputs[0]
                self.outputs[f"{model}.decoder"] = (tensor.name, [int(d) for d in tensor.shape[1:]])

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name in self.outputs)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        name, row_shape = self.outputs[request.model_name]
        rows = int(request.inputs[0].shape[0])
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        response.outputs.add(name=name, datatype="FP32", shape=[rows, *row_shape])
        response.raw_output_contents.append(np.zeros(rows * math.prod(row_shape), np.float32).tobytes())
        return response


async def serve(repository: Path, port: int) -> None:
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20),
                                      ("grpc.max_receive_message_length", 64 << 20)])
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(FloorService(repository), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    import uvloop

    uvloop.run(serve(Path(sys.argv[1]), int(sys.argv[2])))

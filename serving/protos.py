"""The generated protobuf and gRPC modules, (re)generated from protos/ first when missing or stale."""

from __future__ import annotations

from genserve.serving.protos_build import ensure_generated

ensure_generated()

from genserve.serving.generated.genserve.v1 import genserve_pb2, genserve_pb2_grpc  # noqa: E402
from genserve.serving.generated.inference import grpc_service_pb2, grpc_service_pb2_grpc, model_config_pb2  # noqa: E402

__all__ = ["genserve_pb2", "genserve_pb2_grpc", "grpc_service_pb2", "grpc_service_pb2_grpc", "model_config_pb2"]

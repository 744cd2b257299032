"""genserve serving: a gRPC inference server on onnxruntime (see docs/serving.md).

Data flows one way, request to graph:

    cli -> server (grpc.aio, health, reflection, interceptors: auth, decoding)
        -> genserve_service / inference_service (one RPC each, through calls: ids, errors, logs, metrics)
        -> models (ModelManager: versions, leases, hot reload)  -> batcher (DynamicBatcher per graph)
        -> runtime (onnxruntime sessions on a thread pool)

Helpers: config (settings), codec (tensors and PNGs), latents (priors, interpolation), metrics and
statistics (Prometheus, Triton-style counters), logs, errors, protos (generated code, protos_build).
"""

"""The gRPC server: genserve.v1.Genserve and inference.GRPCInferenceService on one port, with
grpc.health.v1 and server reflection, Prometheus metrics on their own port, and graceful shutdown.

Start-up: bind, start (health NOT_SERVING), load and warm up every model, then SERVING and start
polling the repository. Shutdown (SIGTERM/SIGINT): health NOT_SERVING, new calls refused,
in-flight calls get grace_period_s to finish, models unloaded, serving marks removed, exit 0.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from genserve.export import Repository
from genserve.serving.auth import BearerTokenInterceptor
from genserve.serving.calls import Calls, ServerState
from genserve.serving.config import ServerConfig
from genserve.serving.decoding import RequestBudget, RequestDecodingInterceptor
from genserve.serving.genserve_service import GenserveService
from genserve.serving.inference_service import InferenceService
from genserve.serving.logs import log_event
from genserve.serving.metrics import ServerMetrics
from genserve.serving.models import ModelManager, holder_name
from genserve.serving.protos import genserve_pb2, genserve_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc
from genserve.serving.runtime import GPU_PROVIDERS, GpuRequiredError, available_providers
from genserve.serving.worker_group import WorkerContext, WorkerGroup

log = logging.getLogger("genserve.server")
GENSERVE_SERVICE = genserve_pb2.DESCRIPTOR.services_by_name["Genserve"].full_name
INFERENCE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICES = ("", GENSERVE_SERVICE, INFERENCE_SERVICE)
QUIET_BEFORE_CLOSE_S = 0.2  # at shutdown, how long no call may arrive before the port closes
PORT_SETTING = "--port (port: in the config file)"
METRICS_PORT_SETTING = "--metrics-port (metrics_port: in the config file; --no-metrics: none)"


class StartupError(RuntimeError):
    """The server cannot start as configured; the one-line message names the setting that fixes it."""


def check_port_free(host: str, port: int, what: str, setting: str) -> None:
    """Fail before anything starts when host:port is taken, naming the port and the option that changes it.

    A probe socket is bound the way the servers bind theirs (SO_REUSEADDR, so a port in TIME_WAIT is
    free), then closed; a port taken between this check and the real bind still fails in start().
    """
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise StartupError(f"cannot listen on {host!r}: {error.strerror}; set --host to an address of this machine") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise StartupError(
                        f"the {what} {port} on {host} is already in use (another genserve-serve?); "
                        f"choose another with {setting}, or 0 for any free port"
                    ) from None
                if error.errno == errno.EACCES:
                    raise StartupError(
                        f"no permission to listen on the {what} {port} on {host}; choose one above 1023 with {setting}"
                    ) from None
                # Other errors (an IPv6 address of "localhost" on a host without IPv6) are left to
                # the server's own bind, which skips addresses it cannot use.


def check_ports(config: ServerConfig) -> None:
    check_port_free(config.host, config.port, "gRPC port", PORT_SETTING)
    if config.metrics_port is None:
        return
    metrics_host = config.metrics_host or config.host
    if config.metrics_port == config.port != 0 and metrics_host == config.host:
        raise StartupError(f"the gRPC port and the metrics port are both {config.port}; "
                           f"give them different numbers with --port and --metrics-port")
    check_port_free(metrics_host, config.metrics_port, "metrics port", METRICS_PORT_SETTING)


def check_repository(repository: Repository, config: ServerConfig) -> None:
    """A repository that does not exist is an error (a typo, or serving before exporting), unless
    config.wait_for_repository asks to start anyway and load models once it appears."""
    if repository.root.is_dir():
        return
    if not config.wait_for_repository:
        raise StartupError(
            f"the model repository {repository.root} does not exist; check --repository, publish a model into "
            f"it first (genserve-export RUN_DIR --repository {repository.root}), or pass --wait-for-repository "
            "to start anyway and load models once they appear"
        )
    if not config.poll_interval_s:
        raise StartupError("--wait-for-repository needs repository polling; set --poll-interval above 0")
    log_event(log, "waiting_for_repository", level=logging.WARNING, repository=str(repository.root),
              hint=f"models load once published into it (scanned every {config.poll_interval_s:g} s)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """A pool with the files of every service served, for server reflection (the inference.*
    messages live in a private pool, not the default one reflection would search)."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name not in added:
            for dependency in file.dependencies:
                add(dependency)
            pool.AddSerializedFile(file.serialized_pb)
            added.add(file.name)

    for file in (genserve_pb2.DESCRIPTOR, grpc_service_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        add(file)
    return pool


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    tls = config.tls
    if not tls.enabled:
        return None
    key, cert = Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes()  # type: ignore[arg-type]
    client_ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None)


class GenserveServer:
    """One server process's gRPC server, model manager and metrics endpoint. As one of several
    workers (`worker`), it shares the port and agrees with the others on what is SERVING
    (serving/worker_group.py); the supervisor serves the metrics then."""

    def __init__(self, config: ServerConfig, worker: WorkerContext | None = None):
        self.config = config
        self.group = WorkerGroup(worker) if worker is not None else None
        self._following: asyncio.Task[None] | None = None
        self.metrics = ServerMetrics()
        self.state = ServerState()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.manager: ModelManager | None = None
        self._executor = ThreadPoolExecutor(config.inference_threads, thread_name_prefix="genserve-infer")
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._listening = False  # whether `listening` was logged, so that shutdown is worth logging

    async def start(self) -> None:
        """Bind and serve; returns once the initial models are loaded and health is SERVING.

        Whatever keeps the server from starting (no GPU, no repository, a port in use) is raised
        before anything is bound or logged as started."""
        config = self.config
        self._check_gpu()
        repository = Repository(config.repository)
        check_repository(repository, config)
        if self.group is None:  # workers: the supervisor checked, and holds the port for them
            check_ports(config)
        token = config.token()
        self._server = self._create_grpc_server(token)
        credentials = _credentials(config)
        self.port = self._bind(credentials)
        self._warn_if_exposed(secure=credentials is not None, authenticated=token is not None)
        holder = config.serving_holder or holder_name(config.host, self.port)
        if self.group is not None:  # each worker marks what it serves itself
            holder = f"{holder}-w{self.group.context.slot}"
        self.manager = ModelManager(repository, config, self.metrics, self._executor, holder)
        self.manager.group = self.group
        self._add_services(self.manager)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()
        self.metrics_port = self._serve_metrics()
        self._listening = True
        log_event(log, "listening", host=config.host, port=self.port, metrics_port=self.metrics_port,
                  tls=credentials is not None, auth=token is not None, repository=str(repository.root),
                  event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0])
        await self.manager.load_all()
        if self.group is None:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        else:  # SERVING once every worker is ready
            self._following = asyncio.get_running_loop().create_task(self.group.follow(self.manager, self._regroup))
        self.manager.start_polling(config.poll_interval_s)
        self._log_serving(repository)

    # --- start-up steps, in the order start() takes them -----------------------------------------
    def _check_gpu(self) -> None:
        if self.config.require_gpu and not set(available_providers()) & set(GPU_PROVIDERS):
            raise GpuRequiredError(
                f"--require-gpu: onnxruntime offers only {available_providers()}; install onnxruntime-gpu "
                "(the genserve[gpu] extra) on a machine with a CUDA GPU, or drop --require-gpu"
            )

    def _create_grpc_server(self, token: str | None) -> grpc.aio.Server:
        """The gRPC server with its interceptors (bearer token first, then request decoding) and limits."""
        limits = self.config.limits
        interceptors: list[grpc.aio.ServerInterceptor] = [BearerTokenInterceptor(token, self.metrics)] if token else []
        self.request_budget = RequestBudget(limits.max_in_flight_request_bytes)
        interceptors.append(RequestDecodingInterceptor(limits.receive_timeout_s, self.request_budget))
        return grpc.aio.server(
            interceptors=interceptors,
            options=[*limits.grpc_options(), ("grpc.so_reuseport", int(self.group is not None))],
            maximum_concurrent_rpcs=limits.max_concurrent_calls,
        )

    def _bind(self, credentials: grpc.ServerCredentials | None) -> int:
        """Add the port (TLS when credentials are given); returns the port bound."""
        assert self._server is not None
        address = f"{self.config.host}:{self.config.port}"
        try:
            return self._server.add_secure_port(address, credentials) if credentials else self._server.add_insecure_port(address)
        except RuntimeError:  # grpc's "Failed to bind": taken since check_ports, or not an address of this host
            raise StartupError(f"cannot listen on {address} (in use, or not an address of this machine); "
                               f"choose another port with {PORT_SETTING}, or another --host") from None

    def _warn_if_exposed(self, *, secure: bool, authenticated: bool) -> None:
        """Beyond loopback, say so when traffic is unencrypted or calls are unauthenticated."""
        host = self.config.host
        if is_loopback(host):
            return
        if not secure:
            log_event(log, "insecure_listen", level=logging.WARNING, host=host,
                      hint="traffic is unencrypted: set tls.cert_file and tls.key_file")
        if not authenticated:
            log_event(log, "unauthenticated_listen", level=logging.WARNING, host=host,
                      hint="anyone who reaches the port can call it: set auth_token_file")

    def _add_services(self, manager: ModelManager) -> None:
        """genserve.v1.Genserve, the inference protocol, health, and reflection over all of them."""
        assert self._server is not None
        calls = Calls(self.metrics, self.state)
        genserve_pb2_grpc.add_GenserveServicer_to_server(
            GenserveService(manager, calls, self.config.limits), self._server
        )
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceService(manager, calls, self.config.limits, self.state), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (GENSERVE_SERVICE, INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self._server,
            pool=reflection_pool(),
        )

    async def _set_health(self, status: int) -> None:
        for service in HEALTH_SERVICES:
            await self._health.set(service, status)

    async def _regroup(self) -> None:
        """The workers' records changed: retire what every worker has replaced, update health."""
        assert self.manager is not None
        self.manager.regroup()
        if not self.state.shutting_down:
            serving = self.manager.serving_ready
            await self._set_health(health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING)

    def _serve_metrics(self) -> int | None:
        """Start the /metrics endpoint (unless disabled); returns its port."""
        config = self.config
        if config.metrics_port is None:
            return None
        try:
            return self.metrics.serve(
                config.metrics_host or config.host, config.metrics_port, token=config.metrics_token(),
                request_timeout_s=config.metrics_request_timeout_s,
                max_connections=config.metrics_max_connections,
            )
        except OSError as error:  # taken since check_ports
            raise StartupError(f"cannot serve /metrics on port {config.metrics_port} ({error.strerror}); "
                               f"choose another with {METRICS_PORT_SETTING}") from None

    def _log_serving(self, repository: Repository) -> None:
        """Log what serves, and how to publish a model when nothing does."""
        assert self.manager is not None
        config = self.config
        loaded = self.manager.loaded()
        log_event(log, "serving", models=",".join(f"{n}:{vs[-1]}" for n, vs in loaded.items()) or None)
        if not loaded and repository.root.is_dir():
            when = (f"it is loaded within {config.poll_interval_s:g} s" if config.poll_interval_s
                    else "then restart the server (--poll-interval 0: no polling)")
            log_event(log, "no_models", level=logging.WARNING, repository=str(repository.root),
                      hint=f"publish one with: genserve-export RUN_DIR --repository {repository.root}; {when}")

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, refuse new calls, let in-flight ones finish within `grace`."""
        if self.state.shutting_down:
            await self._stopped.wait()
            return
        grace = self.config.grace_period_s if grace is None else grace
        self.state.shutting_down = True
        if self._listening:
            log_event(log, "shutting_down", grace_s=grace)
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            # While in-flight calls finish (at most `grace`), the port stays open: new calls are
            # answered UNAVAILABLE ("shutting down") and health checks NOT_SERVING. The port closes
            # only once no call has arrived for QUIET_BEFORE_CLOSE_S: closing cuts off calls that
            # reached the port but have no handler yet, and their clients would see CANCELLED
            # instead of UNAVAILABLE (clients answered just before closing send their next call at
            # once). Then stop(0) cancels whatever is left and ends the streams (health Watch).
            if self._listening:  # else start-up failed before any call could arrive
                drained = await self.state.wait_quiet(QUIET_BEFORE_CLOSE_S, grace)
                log_event(log, "calls_drained" if drained else "grace_period_over", in_flight=self.state.in_flight)
            await self._server.stop(0)
        if self._following is not None:
            self._following.cancel()
            await asyncio.gather(self._following, return_exceptions=True)
        if self.group is not None:
            self.group.withdraw()
        if self.manager is not None:
            await self.manager.close()
        self.metrics.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._listening:
            log_event(log, "stopped")
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve(config: ServerConfig, worker: WorkerContext | None = None) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully; returns the exit status."""
    server = GenserveServer(config, worker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = loop.create_task(server.start())
    stopping = loop.create_task(stop.wait())
    done, _ = await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if starting in done and starting.exception() is not None:
        stopping.cancel()
        await server.stop(0)
        raise starting.exception()  # type: ignore[misc]
    await stopping
    if not starting.done():
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
    await server.stop()
    return 0

"""Server configuration: dataclasses with defaults, loadable from a YAML or TOML file (--config).

    repository: /srv/models
    port: 8001
    metrics_port: 8002
    poll_interval_s: 5
    limits: {max_samples_per_request: 512}
    defaults:                  # every model (ModelSettings)
      max_batch_size: 64
      max_queue_delay_us: 500
    models:                    # per-model overrides of `defaults`
      mnist-vae: {max_batch_size: 128, execution_provider: cuda}

Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genserve.serving.batcher import POLICIES as BATCHING_POLICIES
from genserve.training.files import ConfigFileError, read_config_mapping  # standard library and PyYAML only

EXECUTION_PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
METRICS_AUTH = ("auto", "none")
VARIANTS = ("fp32", "fp16")
MiB = 1024 * 1024


class ConfigError(ValueError):
    """The configuration file or a setting is invalid; the message names the key."""


def _positive(where: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(f"{where} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


@dataclass(frozen=True)
class ModelSettings:
    """Per-model serving knobs (batching, runtime); `defaults` and `models.<name>` in the file."""

    max_batch_size: int = 64  # rows per execution; bigger requests are split and reassembled
    # false: every request runs on its own (split at max_batch_size), never merged with another one
    dynamic_batching: bool = True
    # When a batch closes (serving/batcher.py). adaptive: at once, unless another request holds the
    # version or requests arrive less than max_queue_delay_us / 4 apart; then it waits while they
    # keep coming, until as many are queued as were recently inside at once, for at most
    # max_queue_delay_us. fixed (Triton's): the oldest request waits up to max_queue_delay_us for
    # company, whether or not anyone is coming.
    batching_policy: str = "adaptive"
    # The longest the oldest queued request waits for others to join (see batching_policy). Under
    # the fixed policy a delay taxes every lone request, so 0 suits it on a CPU. 5000 rather than
    # 2000: 1-sample calls at c=64 merge twice as far (docs/benchmarks.md, "Batches that form").
    max_queue_delay_us: int = 5000
    max_queue_size: int = 64  # queued requests per graph; more are rejected with RESOURCE_EXHAUSTED
    instances: int = 1  # concurrent executions per graph
    # With one instance, a batch whose size recently ran faster than this runs on the event loop's
    # thread: the hand-over to the inference thread and back costs more than a small graph's run
    # (docs/benchmarks.md). The loop is blocked meanwhile, so keep it small; 0: always hand over.
    inline_execution_us: int = 200
    execution_provider: str = "auto"  # auto (CUDA if onnxruntime has it, else CPU) | cpu | cuda | tensorrt
    intra_op_threads: int = 0  # onnxruntime intra-op threads per session; 0: onnxruntime's default
    # false: onnxruntime frees CPU buffers after each run instead of keeping them in its arena; less
    # memory for big conv models at large batches, slower executions (docs/benchmarks.md)
    cpu_memory_arena: bool = True
    variant: str = "fp32"  # which ONNX file of each part: fp32 or fp16 (falls back to fp32 if absent)
    warmup_batch_sizes: tuple[int, ...] = ()  # (): 1 and max_batch_size
    max_loaded_versions: int = 1  # newest versions kept loaded; requests may name any of them

    def validate(self, where: str = "defaults") -> None:
        for name in ("max_batch_size", "max_queue_size", "instances", "max_loaded_versions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}.{name} must be a positive integer, got {value!r}")
        for name in ("max_queue_delay_us", "intra_op_threads", "inline_execution_us"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{where}.{name} must be a non-negative integer, got {value!r}")
        for name in ("dynamic_batching", "cpu_memory_arena"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{where}.{name} must be true or false, got {getattr(self, name)!r}")
        if self.execution_provider not in EXECUTION_PROVIDERS:
            raise ConfigError(
                f"{where}.execution_provider must be one of {', '.join(EXECUTION_PROVIDERS)}, "
                f"got {self.execution_provider!r}"
            )
        if self.batching_policy not in BATCHING_POLICIES:
            raise ConfigError(
                f"{where}.batching_policy must be one of {', '.join(BATCHING_POLICIES)}, got {self.batching_policy!r}"
            )
        if self.variant not in VARIANTS:
            raise ConfigError(f"{where}.variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.warmup_batch_sizes):
            raise ConfigError(f"{where}.warmup_batch_sizes must be positive integers, got {self.warmup_batch_sizes!r}")

    @property
    def warmup_sizes(self) -> tuple[int, ...]:
        sizes = self.warmup_batch_sizes or (1, self.max_batch_size)
        return tuple(sorted({min(b, self.max_batch_size) for b in sizes}))


@dataclass(frozen=True)
class Limits:
    """What one client may make the server hold, and for how long (docs/serving.md, "Limits").

    Requests over a per-request limit end with INVALID_ARGUMENT; load over a server-wide one with
    RESOURCE_EXHAUSTED (retry later); a message that does not arrive in time with DEADLINE_EXCEEDED.
    The connection settings are gRPC's own server options.
    """

    max_message_bytes: int = 64 * MiB  # gRPC send and receive limit
    max_samples_per_request: int = 1024  # Generate count, Interpolate steps
    max_images_per_request: int = 1024  # images sent in Encode, Reconstruct, Denoise
    # bytes of request messages held at once across all calls (RESOURCE_EXHAUSTED beyond)
    max_in_flight_request_bytes: int = 256 * MiB
    max_concurrent_calls: int = 1024  # calls in progress server-wide (gRPC maximum_concurrent_rpcs)
    # HTTP/2 concurrent streams per connection (grpc.max_concurrent_streams). gRPC counts a stream until
    # the server has freed its call, which under load lags the response, and refuses streams beyond the
    # limit (REFUSED_STREAM: UNAVAILABLE): at 100, a client with 64 calls in flight on a busy 2-core
    # server lost 1-2 % of them (docs/benchmarks.md). So one connection may use every call slot.
    max_streams_per_connection: int = 1024
    # from a call's headers to its whole request message; 0: not policed (cheaper calls, behind a proxy
    # that times requests out: serving/decoding.py)
    receive_timeout_s: float = 30.0
    connection_idle_timeout_s: float = 300.0  # a connection without calls is closed after this (grpc.max_connection_idle_ms)
    # connections are asked to reconnect after max_connection_age_s (clients do so transparently);
    # calls still running then get connection_age_grace_s before the connection is closed
    max_connection_age_s: float = 3600.0
    connection_age_grace_s: float = 60.0
    keepalive_time_s: float = 60.0  # the server pings a connection with calls after this much silence...
    keepalive_timeout_s: float = 20.0  # ...and closes it when the ping is not answered within this
    max_temperature: float = 100.0  # Generate temperature (a factor on the prior's spread)
    max_latent_abs: float = 1.0e4  # largest |value| in latents a request may send (Generate, Interpolate, ModelInfer)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in (int, "int"):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"limits.{f.name} must be a positive integer, got {value!r}")
            else:  # receive_timeout_s 0: unary methods stay unary (serving/decoding.py)
                _positive(f"limits.{f.name}", value, allow_zero=f.name == "receive_timeout_s")

    def grpc_options(self) -> list[tuple[str, int]]:
        """The gRPC server options these limits set."""
        ms = lambda seconds: int(seconds * 1000)  # noqa: E731
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
            ("grpc.max_connection_idle_ms", ms(self.connection_idle_timeout_s)),
            ("grpc.max_connection_age_ms", ms(self.max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", ms(self.connection_age_grace_s)),
            ("grpc.keepalive_time_ms", ms(self.keepalive_time_s)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_s)),
            # clients may ping (their keepalive) as often as every 10 s, also between calls
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the gRPC port: cert and key (PEM); with client_ca_file, clients must present a certificate."""

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    def validate(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("tls.cert_file and tls.key_file go together: give both or neither")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ConfigError("tls.client_ca_file (client certificates) needs tls.cert_file and tls.key_file")
        for name in ("cert_file", "key_file", "client_ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"tls.{name} {path} does not exist")


@dataclass(frozen=True)
class ServerConfig:
    repository: str = ""
    host: str = "127.0.0.1"
    port: int = 8001  # 0: any free port
    metrics_port: int | None = 8002  # 0: any free port; null: no metrics endpoint
    metrics_host: str | None = None  # None: the same as host
    # /metrics auth: "auto" asks for the gRPC bearer token when the server has one (and for
    # metrics_token_file's token when that is set); "none" leaves it open (bind it to loopback then)
    metrics_auth: str = "auto"
    metrics_token_file: str | None = None  # a separate bearer token for /metrics
    metrics_request_timeout_s: float = 10.0  # an HTTP request to /metrics must arrive within this
    metrics_max_connections: int = 16  # HTTP connections served at once; more are closed at once
    poll_interval_s: float = 5.0  # repository polling for new versions; 0: never poll
    wait_for_repository: bool = False  # start when the repository does not exist yet (else an error)
    require_gpu: bool = False  # refuse to serve a graph that onnxruntime runs on the CPU
    inference_threads: int = 2  # threads running onnxruntime sessions (off the event loop)
    # server processes sharing the port (SO_REUSEPORT), each with its own event loop, sessions and
    # batchers, under one supervisor (serving/workers.py); 1: this process serves alone
    workers: int = 1
    grace_period_s: float = 10.0  # on SIGTERM/SIGINT, in-flight calls get this long to finish
    event_loop: str = "auto"  # auto (uvloop when installed, else asyncio's) | uvloop | asyncio
    log_json: bool = False
    log_level: str = "info"
    auth_token: str | None = None  # bearer token required on every call but health
    auth_token_file: str | None = None  # or read it from this file
    serving_holder: str | None = None  # name of this server's serving mark; None: genserve-<host>-<port>
    tls: TlsConfig = field(default_factory=TlsConfig)
    limits: Limits = field(default_factory=Limits)
    defaults: ModelSettings = field(default_factory=ModelSettings)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> ModelSettings overrides

    def validate(self) -> ServerConfig:
        if not self.repository:
            raise ConfigError("no model repository: pass --repository REPO or set `repository` in the config file")
        for name in ("port",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
                raise ConfigError(f"{name} must be a port number (0-65535), got {value!r}")
        if self.metrics_port is not None and not (
            isinstance(self.metrics_port, int) and 0 <= self.metrics_port <= 65535
        ):
            raise ConfigError(f"metrics_port must be a port number or null, got {self.metrics_port!r}")
        _positive("poll_interval_s", self.poll_interval_s, allow_zero=True)
        for name in ("wait_for_repository", "require_gpu", "log_json"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _positive("grace_period_s", self.grace_period_s, allow_zero=True)
        if isinstance(self.inference_threads, bool) or not isinstance(self.inference_threads, int) or self.inference_threads < 1:
            raise ConfigError(f"inference_threads must be a positive integer, got {self.inference_threads!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"workers must be a positive integer (server processes), got {self.workers!r}")
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError(f"event_loop must be one of {', '.join(EVENT_LOOPS)}, got {self.event_loop!r}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log_level must be debug, info, warning or error, got {self.log_level!r}")
        if self.auth_token is not None and self.auth_token_file is not None:
            raise ConfigError("give auth_token or auth_token_file, not both")
        if self.metrics_auth not in METRICS_AUTH:
            raise ConfigError(f"metrics_auth must be one of {', '.join(METRICS_AUTH)}, got {self.metrics_auth!r}")
        if self.metrics_auth == "none" and self.metrics_token_file is not None:
            raise ConfigError("metrics_token_file sets a token for /metrics, but metrics_auth is none; drop one of them")
        _positive("metrics_request_timeout_s", self.metrics_request_timeout_s)
        if isinstance(self.metrics_max_connections, bool) or not isinstance(self.metrics_max_connections, int) \
                or self.metrics_max_connections < 1:
            raise ConfigError(f"metrics_max_connections must be a positive integer, got {self.metrics_max_connections!r}")
        self.tls.validate()
        self.limits.validate()
        self.defaults.validate()
        for name in self.models:
            self.settings_for(name)
        return self

    def settings_for(self, model: str) -> ModelSettings:
        """`defaults` overlaid with `models.<model>`."""
        overrides = self.models.get(model) or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"models.{model} must be a mapping of settings, got {overrides!r}")
        settings = _build(ModelSettings, {**dataclasses.asdict(self.defaults), **overrides}, f"models.{model}")
        settings.validate(f"models.{model}")
        return settings

    def token(self) -> str | None:
        """The bearer token, read from auth_token_file if that is how it was given."""
        if self.auth_token_file is not None:
            token = Path(self.auth_token_file).read_text().strip()
            if not token:
                raise ConfigError(f"auth_token_file {self.auth_token_file} is empty")
            return token
        return self.auth_token

    def metrics_token(self) -> str | None:
        """The bearer token /metrics asks for, or None when it is open."""
        if self.metrics_auth == "none":
            return None
        if self.metrics_token_file is not None:
            token = Path(self.metrics_token_file).read_text().strip()
            if not token:
                raise ConfigError(f"metrics_token_file {self.metrics_token_file} is empty")
            return token
        return self.token()


def _build(cls: type, data: Any, where: str) -> Any:
    """A dataclass from a mapping, recursively; unknown keys raise ConfigError naming them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the configuration'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(f'{where}.{k}'.lstrip('.') for k in unknown)}; "
            f"valid keys{' in ' + where if where else ''}: {', '.join(sorted(known))}"
        )
    values = {}
    for key, value in data.items():
        hint = hints[key]
        path = f"{where}.{key}".lstrip(".")
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value, path)
        elif typing.get_origin(hint) is tuple and isinstance(value, list | tuple):
            value = tuple(value)
        elif hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        values[key] = value
    return cls(**values)


def load_config(path: str | Path | None, **overrides: Any) -> ServerConfig:
    """ServerConfig from a YAML (.yaml/.yml/.json) or TOML (.toml) file, then `overrides` (CLI flags) on top.

    Overrides that are None are ignored; dict overrides are merged into the file's section.
    The result is validated.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = read_config_mapping(path)
        except ConfigFileError as error:
            raise ConfigError(str(error)) from error
    for key, value in overrides.items():
        if isinstance(value, dict):  # nested settings (tls, limits, defaults): merge key by key
            value = {k: v for k, v in value.items() if v is not None}
            if not value:
                continue
            base = data.get(key)
            data[key] = {**base, **value} if isinstance(base, dict) else value
        elif value is not None:
            data[key] = value
    return _build(ServerConfig, data, "").validate()

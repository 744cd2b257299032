"""`genserve-serve --workers N`: a small supervisor over N server processes sharing one port.

Each worker is a whole genserve server (serving/server.py) in its own process, started with
multiprocessing's spawn (a fresh interpreter: no gRPC or onnxruntime state forked), with its own
event loop, onnxruntime sessions and batchers. All of them bind the same port with SO_REUSEPORT
and the kernel spreads new connections over them (a connection stays with one worker).

The supervisor itself serves no RPC. It
  * checks the ports, then holds the gRPC port (a bound, not listening, SO_REUSEPORT socket) so
    that port 0 picks one port for every worker and a restarted worker gets the same one;
  * serves /metrics once for all workers (prometheus_client's multiprocess mode: every process
    writes its metrics to files in PROMETHEUS_MULTIPROC_DIR, the supervisor's collector sums them);
  * restarts a worker that dies (logged as worker_died, counted in genserve_worker_restarts_total),
    after a pause that grows while it keeps dying young; a worker that fails before the group was
    first ready ends the whole server with its exit status (a bad setting would fail every time);
  * on SIGTERM/SIGINT sends SIGTERM to every worker, each drains its in-flight calls as a single
    server does (docs/serving.md), and exits once all have exited (0 when all exited 0).
What is SERVING across workers is decided by the workers themselves (serving/worker_group.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genserve.serving.config import ServerConfig
from genserve.serving.logs import configure_logging, log_event
from genserve.serving.worker_group import WorkerContext, read_records, record_path

if TYPE_CHECKING:  # imported at run time only once PROMETHEUS_MULTIPROC_DIR is set (see supervise)
    from genserve.serving.metrics import SupervisorMetrics

log = logging.getLogger("genserve.workers")
STARTUP_FAILED = 1
STOP_MARGIN_S = 10.0  # beyond grace_period_s, how long a worker may take to exit before it is killed
YOUNG_S = 10.0  # a worker that dies younger than this is restarted after a growing pause...
MAX_PAUSE_S = 30.0  # ...of at most this
TICK_S = 0.1


@dataclass
class Slot:
    """One worker's place: the process now in it, and how it has been doing."""

    index: int
    process: Any = None  # multiprocessing.Process
    started_at: float = 0.0
    restart_at: float | None = None  # when a dead worker's replacement is due
    quick_deaths: int = 0
    ready: bool = False


@dataclass
class Supervisor:
    """The worker slots of one server, and what to do when a worker starts, dies or stops."""

    config: ServerConfig  # the workers' config: the held port, no metrics port
    state_dir: Path  # the workers' records (serving/worker_group.py)
    slots: list[Slot] = field(default_factory=list)
    all_ready: bool = False  # every worker ready now
    all_ready_once: bool = False  # ... at some time: from then on, a worker that dies is restarted

    def __post_init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")
        self.slots = [Slot(i) for i in range(self.config.workers)]

    # --- processes -------------------------------------------------------------------------------
    def start(self, slot: Slot) -> None:
        context = WorkerContext(slot.index, self.config.workers, str(self.state_dir), os.getpid())
        process = self._context.Process(target=worker_main, args=(self.config, context),
                                        name=f"genserve-worker-{slot.index}")
        process.start()
        slot.process, slot.started_at, slot.restart_at, slot.ready = process, time.monotonic(), None, False
        log_event(log, "worker_started", worker=slot.index, pid=process.pid)

    def running(self) -> list[Slot]:
        return [s for s in self.slots if s.process is not None and s.process.is_alive()]

    def reap(self, metrics: SupervisorMetrics) -> int | None:
        """Handle workers that exited; returns an exit status when the whole server must end."""
        for slot in self.slots:
            process = slot.process
            if process is None or process.exitcode is None:
                continue
            slot.process = None
            metrics.worker_gone(process.pid)
            record_path(self.state_dir, slot.index).unlink(missing_ok=True)
            code = process.exitcode
            how = {"signal": signal.Signals(-code).name} if code < 0 else {"exit_status": code}
            if not self.all_ready_once:
                log_event(log, "worker_failed_to_start", level=logging.ERROR, worker=slot.index, pid=process.pid, **how,
                          hint="see the worker's own log lines above; the other workers are stopped")
                return code if code > 0 else STARTUP_FAILED
            age = time.monotonic() - slot.started_at
            slot.quick_deaths = slot.quick_deaths + 1 if age < YOUNG_S else 0
            pause = min(MAX_PAUSE_S, 2.0 ** slot.quick_deaths - 1)
            slot.restart_at = time.monotonic() + pause
            metrics.restarts.inc()
            log_event(log, "worker_died", level=logging.ERROR, worker=slot.index, pid=process.pid, **how,
                      age_s=round(age, 1), restart_in_s=pause)
        return None

    def restart_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.process is None and slot.restart_at is not None and now >= slot.restart_at:
                self.start(slot)

    def follow_readiness(self) -> None:
        """Log each worker's becoming ready, and the whole group's (again after a restart)."""
        records = read_records(self.state_dir)
        for slot in self.slots:
            record = records.get(slot.index)
            ready = record is not None and slot.process is not None and record.pid == slot.process.pid and record.ready
            if ready and not slot.ready:
                log_event(log, "worker_ready", worker=slot.index, pid=slot.process.pid)
            slot.ready = ready
        all_ready = all(s.ready for s in self.slots)
        if all_ready and not self.all_ready:
            log_event(log, "workers_serving", workers=len(self.slots), pids=",".join(str(s.process.pid) for s in self.slots))
        self.all_ready = all_ready
        self.all_ready_once = self.all_ready_once or all_ready

    def stop_all(self) -> int:
        """SIGTERM every worker, wait for them to drain and exit (SIGKILL past the grace period)."""
        running = self.running()
        log_event(log, "stopping_workers", workers=len(running), grace_s=self.config.grace_period_s)
        for slot in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.grace_period_s + STOP_MARGIN_S
        status = 0
        for slot in running:
            slot.process.join(max(0.0, deadline - time.monotonic()))
            if slot.process.exitcode is None:
                log_event(log, "worker_killed", level=logging.ERROR, worker=slot.index, pid=slot.process.pid,
                          hint=f"it did not exit within grace_period_s + {STOP_MARGIN_S:g} s")
                slot.process.kill()
                slot.process.join(5)
            if slot.process.exitcode != 0:
                status = 1
        return status


def worker_main(config: ServerConfig, context: WorkerContext) -> None:
    """A worker process: one whole server on the shared port (run by multiprocessing spawn)."""
    from genserve.serving.cli import run_server

    configure_logging(config.log_json, config.log_level, {"worker": context.slot, "pid": os.getpid()})
    raise SystemExit(run_server(config, context))


def hold_port(host: str, port: int) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket on host:port (port 0: a free one): the workers
    bind the same port beside it; it takes no connections itself."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        holder.bind((host.strip("[]"), port))
    except OSError:
        holder.close()
        raise
    return holder


def _multiprocess_dir(root: Path) -> str:
    """PROMETHEUS_MULTIPROC_DIR as given (emptied of old files, as prometheus_client asks), or a
    folder in `root` (removed at exit)."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        for old in Path(given).glob("*.db"):
            old.unlink()
        return given
    path = root / "metrics"
    path.mkdir()
    return str(path)


def supervise(config: ServerConfig) -> int:
    """Run config.workers server processes on one port until SIGTERM/SIGINT; returns the exit status."""
    if not hasattr(socket, "SO_REUSEPORT"):
        log_event(log, "startup_failed", level=logging.ERROR,
                  error="--workers needs SO_REUSEPORT (Linux, BSD, macOS); run one process per port instead")
        return STARTUP_FAILED
    root = Path(tempfile.mkdtemp(prefix="genserve-workers-"))
    metrics_dir = _multiprocess_dir(root)
    # Before prometheus_client is imported, here and (inherited) in every spawned worker.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        return _supervise(config, root / "state", metrics_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _supervise(config: ServerConfig, state_dir: Path, metrics_dir: str) -> int:
    from genserve.serving.metrics import SupervisorMetrics
    from genserve.serving.server import METRICS_PORT_SETTING, PORT_SETTING, StartupError, check_ports

    stop_signal: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: stop_signal.append(number))
    try:
        check_ports(config)
        port_holder = hold_port(config.host, config.port)
    except StartupError as error:
        log_event(log, "startup_failed", level=logging.ERROR, error=str(error))
        return STARTUP_FAILED
    except OSError as error:
        log_event(log, "startup_failed", level=logging.ERROR,
                  error=f"cannot hold port {config.port} on {config.host} ({error.strerror}); choose another with {PORT_SETTING}")
        return STARTUP_FAILED
    port = port_holder.getsockname()[1]
    metrics = SupervisorMetrics(metrics_dir)
    metrics_port = None
    if config.metrics_port is not None:
        try:
            metrics_port = metrics.endpoint.serve(
                config.metrics_host or config.host, config.metrics_port, token=config.metrics_token(),
                request_timeout_s=config.metrics_request_timeout_s, max_connections=config.metrics_max_connections,
            )
        except OSError as error:
            port_holder.close()
            log_event(log, "startup_failed", level=logging.ERROR,
                      error=f"cannot serve /metrics on port {config.metrics_port} ({error.strerror}); "
                            f"choose another with {METRICS_PORT_SETTING}")
            return STARTUP_FAILED
    state_dir.mkdir()
    # The workers serve on the held port; the supervisor serves their metrics.
    worker_config = dataclasses.replace(config, port=port, metrics_port=None)
    supervisor = Supervisor(worker_config, state_dir)
    log_event(log, "supervising", workers=config.workers, host=config.host, port=port, metrics_port=metrics_port,
              supervisor_pid=os.getpid(), state_dir=str(state_dir), metrics_dir=metrics_dir)
    status = 0
    try:
        for slot in supervisor.slots:
            supervisor.start(slot)
        while not stop_signal:
            processes = [s.process.sentinel for s in supervisor.slots if s.process is not None]
            multiprocessing.connection.wait(processes, timeout=TICK_S)
            if stop_signal:  # workers that exit on the same signal (Ctrl-C reaches them too) are not restarted
                break
            failed = supervisor.reap(metrics)
            if failed is not None:
                status = failed
                break
            supervisor.restart_due()
            supervisor.follow_readiness()
            metrics.workers.set(len(supervisor.running()))
        if stop_signal:
            log_event(log, "shutting_down", signal=signal.Signals(stop_signal[0]).name)
        stopped = supervisor.stop_all()
        status = status or stopped
    finally:
        for slot in supervisor.slots:
            if slot.process is not None:
                if slot.process.is_alive():
                    slot.process.kill()
                    slot.process.join(5)
                metrics.worker_gone(slot.process.pid)
        metrics.endpoint.stop()
        port_holder.close()
    log_event(log, "stopped", exit_status=status)
    return status

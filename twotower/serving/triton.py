"""Stage 7: the Triton Inference Server binary shipped in the nvidia-pytriton wheel.

Started by the project on loopback; the process that starts it owns it (see
``TritonServer``). Only the python backend exists in that build, which is why
the ensemble runs TensorFlow inside Merlin's python executor model.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from dataclasses import astuple, dataclass
from pathlib import Path

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from twotower.config import RecipeConfig, ServeConfig
from twotower.offline import TELEMETRY_OFF
from twotower.serving.events import EVENTS_MODEL, EVENTS_MODEL_SOURCE
from twotower.store.artifacts import MissingArtifact
from twotower.store.manifest import ArtifactMismatch

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
TCP_LISTEN = "0A"  # socket state in /proc/net/tcp
PORT_ATTEMPTS = 3
# Triton's own grace period on SIGTERM. Unloading a python-backend instance (its interpreter and
# TensorFlow) takes a few seconds on a busy machine, one instance after the other: two took more
# than 5 s in CI and the server exited with code 1. stop() still kills after STOP_TIMEOUT_S.
EXIT_TIMEOUT_S = 20
STOP_TIMEOUT_S = 30.0
READY_PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backends: Path
    stub: Path
    libs: Path


def find_triton() -> TritonInstall:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nvidia-pytriton is not installed; run `make venv`")
    root = Path(list(spec.submodule_search_locations)[0])
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        binary=root / "tritonserver" / "bin" / "tritonserver",
        backends=root / "tritonserver" / "backends",
        stub=root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub",
        libs=root.parent / "nvidia_pytriton.libs",
    )
    for path in (install.binary, install.backends, install.stub):
        if not path.exists():
            raise FileNotFoundError(f"Triton install incomplete: {path} is missing")
    return install


def prepare_backends(install: TritonInstall, backend_dir: Path) -> Path:
    """A copy of the backends with the python stub for this interpreter beside the backend."""
    python_backend = backend_dir / "python"
    if not (python_backend / "triton_python_backend_stub").exists():
        shutil.copytree(install.backends, backend_dir, dirs_exist_ok=True)
        shutil.copy2(install.stub, python_backend / "triton_python_backend_stub")
    return backend_dir


def server_environment(install: TritonInstall) -> dict[str, str]:
    """The stub finds this venv through PATH and must load this interpreter's libpython."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    libs = [sysconfig.get_config_var("LIBDIR"), str(install.libs), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(TELEMETRY_OFF)
    return env


@dataclass(frozen=True)
class ServerPorts:
    grpc: int
    http: int
    metrics: int

    def items(self) -> list[tuple[str, int]]:
        return [("grpc", self.grpc), ("http", self.http), ("metrics", self.metrics)]


def server_command(
    install: TritonInstall, model_repository: Path, backend_dir: Path, host: str, ports: ServerPorts, models: list[str]
) -> list[str]:
    return [
        str(install.binary),
        f"--model-repository={model_repository}",
        f"--backend-directory={backend_dir}",
        f"--grpc-address={host}",
        f"--grpc-port={ports.grpc}",
        f"--http-address={host}",
        f"--http-port={ports.http}",
        f"--metrics-address={host}",
        f"--metrics-port={ports.metrics}",
        "--allow-gpu-metrics=false",
        "--disable-auto-complete-config",
        # Only the recipe's models: anything else in the folder (an interrupted export's staging
        # folder, another project's model) is never loaded or served.
        "--model-control-mode=explicit",
        *(f"--load-model={name}" for name in models),
        # On SIGTERM Triton waits this long for in-flight requests before it exits anyway.
        f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
    ]


class PortInUse(RuntimeError):
    """A port the server needs is taken: the recipe never talks to a server it did not start."""


def listening_sockets(port: int) -> set[str]:
    """Socket inodes listening on ``port`` on any local address (from /proc/net/tcp and tcp6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == TCP_LISTEN:
                inodes.add(fields[9])
    return inodes


def _pids_holding(inodes: set[str], pids: list[str] | None = None) -> list[int]:
    """Processes (of ``pids``, default all) with one of these socket inodes open."""
    targets = {f"socket:[{inode}]" for inode in inodes}
    holders = []
    for pid in pids if pids is not None else [p for p in os.listdir("/proc") if p.isdigit()]:
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in targets for fd in os.listdir(f"/proc/{pid}/fd")):
                holders.append(int(pid))
        except OSError:  # gone, or not ours to read
            continue
    return holders


def _describe(pid: int) -> str:
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        name = "?"
    return f"pid {pid} ({name})"


def port_holder(port: int) -> str | None:
    """Who listens on ``port``, e.g. 'pid 123 (tritonserver)'; None if nobody or not found."""
    holders = _pids_holding(listening_sockets(port))
    return ", ".join(_describe(pid) for pid in holders) or None


def check_port_free(host: str, name: str, port: int, setting: str) -> None:
    """PortInUse naming the holder if ``port`` is taken; ``setting`` is the key that chooses it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As a server binds: a port left in TIME_WAIT by a stopped server counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            busy = bool(listening_sockets(port))  # e.g. a listener on another address
        except OSError:
            busy = True
    if busy:
        holder = port_holder(port)
        raise PortInUse(
            f"{name} port {port} on {host} is already in use"
            f"{f' by {holder}' if holder else ''}; stop that process or choose another port "
            f"({setting}, 0 picks a free one)"
        )


def check_ports_free(host: str, ports: ServerPorts) -> None:
    for name, port in ports.items():
        check_port_free(host, name, port, f"serve.{name}_port")


def free_port_numbers(host: str, count: int) -> list[int]:
    """Ports the kernel reports free now (another process may still take one before the server
    binds it: ``TritonServer.start`` then retries with new ones)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_ports(host: str) -> ServerPorts:
    return ServerPorts(*free_port_numbers(host, 3))


def set_parent_death_signal() -> None:
    """In the child before exec: SIGTERM when the parent dies, even by SIGKILL (Linux).

    The kernel sends it when the thread that started the server exits, so start
    servers from a thread that lives as long as they should (the main thread does).
    """
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the call above took effect
        os._exit(1)


def _exit_on_signal(signum: int, _frame) -> None:
    # Unwinds like Ctrl-C does: context managers and atexit stop the servers on the way out.
    raise SystemExit(128 + signum)


def _stop_on_termination_signals() -> None:
    """SIGTERM and SIGHUP end this process through Python's exit path (not the default
    abrupt death), so the servers it started stop with it. Only where the process has
    not chosen its own handlers, and only from the main thread (Python's rule)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _exit_on_signal)


class TritonServer:
    """A tritonserver process owned by this one; use as a context manager.

    Ownership: the server runs in its own process group (so a terminal's Ctrl-C reaches
    this process, which then stops it in order), is stopped on normal exit, Ctrl-C,
    SIGTERM and SIGHUP, and receives SIGTERM from the kernel if this process dies
    without a chance to clean up (SIGKILL). Stopping takes the whole group, python
    backend stubs included, and returns only when none of it is left.

    Ports set to 0 in ``config`` are picked free at start. Before starting, every port
    must be free; the server counts as ready only once its own log shows it bound
    them, the listening sockets belong to its pid, and its model is ready.
    """

    def __init__(self, model_repository: Path, work_dir: Path, config: ServeConfig):
        self.config = config
        self.model_repository = Path(model_repository).resolve()
        self.work_dir = Path(work_dir)
        self.log_path = self.work_dir / "tritonserver.log"
        self.process: subprocess.Popen | None = None
        self.ports: ServerPorts | None = None

    @property
    def models(self) -> list[str]:
        """The recommender, and the event endpoint where the export has one."""
        events = (self.model_repository / EVENTS_MODEL / "config.pbtxt").exists()
        return [self.config.model_name, *([EVENTS_MODEL] if events else [])]

    @property
    def grpc_url(self) -> str:
        return f"{self.config.host}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.host}:{self.ports.metrics}/metrics"

    def start(self) -> TritonServer:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"tritonserver already running (pid {self.process.pid})")
        if not (self.model_repository / self.config.model_name / "config.pbtxt").exists():
            raise MissingArtifact(
                f"no exported model {self.config.model_name!r} in {self.model_repository}: run the 'export' stage first"
            )
        configured = ServerPorts(self.config.grpc_port, self.config.http_port, self.config.metrics_port)
        pick = 0 in (configured.grpc, configured.http, configured.metrics)
        attempts = PORT_ATTEMPTS if pick else 1
        for attempt in range(attempts):
            chosen = free_ports(self.config.host) if pick else configured
            self.ports = ServerPorts(*(c or f for c, f in zip(astuple(configured), astuple(chosen))))
            check_ports_free(self.config.host, self.ports)
            self._launch()
            try:
                self.wait_ready()
                return self
            except PortInUse:  # another process took a picked port between the check and the bind
                self.stop()
                if attempt == attempts - 1:
                    raise
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        install = find_triton()
        backend_dir = prepare_backends(install, self.work_dir / "backends")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                server_command(install, self.model_repository, backend_dir, self.config.host, self.ports, self.models),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=server_environment(install),
                start_new_session=True,
                preexec_fn=set_parent_death_signal,
            )
        _RUNNING.add(self)
        atexit.register(self.stop)
        _stop_on_termination_signals()

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _bound_ports(self) -> bool:
        """True once this server's log says all three endpoints are listening; PortInUse if
        it says one could not be bound (the process then exits on its own)."""
        log = self.log_path.read_text(errors="replace")
        if "Address already in use" in log:
            raise PortInUse(
                f"tritonserver (pid {self.process.pid}) could not bind its ports {self.ports}:\n{self.log_tail(15)}"
            )
        return all(
            marker in log
            for marker in (
                f"Started GRPCInferenceService at {self.config.host}:{self.ports.grpc}",
                f"Started HTTPService at {self.config.host}:{self.ports.http}",
                f"Started Metrics Service at {self.config.host}:{self.ports.metrics}",
            )
        )

    def _owns_ports(self) -> bool:
        """The listening sockets belong to this server's pid, not to whoever else answers there."""
        return all(_pids_holding(listening_sockets(port), [str(self.process.pid)]) for _, port in self.ports.items())

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        with grpcclient.InferenceServerClient(self.grpc_url) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    error = RuntimeError(f"tritonserver exited with code {self.process.returncode}:\n{self.log_tail()}")
                    self._bound_ports()  # a bind failure is reported as such
                    raise error
                if self._bound_ports():
                    if not self._owns_ports():
                        raise PortInUse(
                            f"tritonserver (pid {self.process.pid}) reports its ports {self.ports} bound, "
                            "but it does not hold them"
                        )
                    try:
                        if client.is_server_ready(client_timeout=READY_PROBE_TIMEOUT_S) and all(
                            client.is_model_ready(name, client_timeout=READY_PROBE_TIMEOUT_S) for name in self.models
                        ):
                            return
                    except InferenceServerException:  # still loading
                        pass
                time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"tritonserver not ready after {self.config.startup_timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (graceful), then SIGKILL to the whole process group, python backend stubs
        included; returns when no process of the group is left."""
        atexit.unregister(self.stop)
        _RUNNING.discard(self)
        if self.process is None:
            return
        group = self.process.pid  # the server leads its own process group
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        self.process.wait()
        _wait_for_group_exit(group)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def command_line(pid: int) -> list[str]:
    """A process's arguments, program first; empty once it is gone (or not ours to read)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1]
    except OSError:
        return []


def recipe_servers(model_repository: Path) -> list[str]:
    """The gRPC addresses of the running servers the recipe started on ``model_repository``: a
    ``tritonserver`` from the wheel with the recipe's command line (``server_command``), holding
    its gRPC port. Another process that started one (``twotower serve``) is found this way; a
    server anyone else started, or one serving another folder, is not."""
    binary = str(find_triton().binary)
    repository = f"--model-repository={Path(model_repository).resolve()}"
    addresses = []
    for pid, _ in _process_stats():
        command = command_line(pid)
        if command[:2] != [binary, repository] or "--model-control-mode=explicit" not in command:
            continue
        options = dict(arg.removeprefix("--").split("=", 1) for arg in command[1:] if "=" in arg)
        if _pids_holding(listening_sockets(int(options["grpc-port"])), [str(pid)]):
            addresses.append(f"{options['grpc-address']}:{options['grpc-port']}")
    return addresses


# The executor model.py every export installs; Triton runs each version's copy.
EXECUTOR_MODEL_SOURCE = Path(__file__).with_name("executor_model.py")


def check_exported_code(model_dir: Path, source: Path = EXECUTOR_MODEL_SOURCE) -> None:
    """Refuse an exported model whose versions hold another ``model.py`` than this package's ``source``:
    they were exported by another version of the recipe (an earlier layout of the package, say),
    whose pickled graph names modules that may no longer exist."""
    current = source.read_bytes()
    stale = sorted(path.parent.name for path in Path(model_dir).glob("*/model.py") if path.read_bytes() != current)
    if stale:
        raise ArtifactMismatch(
            f"{model_dir} (version {stale[-1]}) was exported by another version of twotower: "
            "run `twotower export` again"
        )


def triton_server(config: RecipeConfig) -> TritonServer:
    """A server (not started) for this run's exported model repository, logging under the run; an
    export written by another version of the package is refused first."""
    check_exported_code(config.export_dir / config.serve.model_name)
    check_exported_code(config.export_dir / EVENTS_MODEL, EVENTS_MODEL_SOURCE)
    return TritonServer(config.export_dir, config.output_dir / "triton", config.serve)


def _process_stats() -> Iterator[tuple[int, list[str]]]:
    """Every process as (pid, fields of /proc/<pid>/stat after its name: state, ppid, pgid, ...)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                yield int(entry), Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue


def process_group(group: int) -> list[int]:
    """Live (not zombie) processes of a process group, e.g. a server and its backend stubs."""
    return [pid for pid, fields in _process_stats() if int(fields[2]) == group and fields[0] != "Z"]


def child_processes(pid: int) -> list[int]:
    return [child for child, fields in _process_stats() if int(fields[1]) == pid]


_RUNNING: set[TritonServer] = set()


def running_servers() -> list[TritonServer]:
    """Servers this process started and has not stopped (the tests attach their logs to failures)."""
    return list(_RUNNING)


def _wait_for_group_exit(group: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise RuntimeError(f"processes of tritonserver's group {group} still exist {timeout_s:.0f}s after SIGKILL")

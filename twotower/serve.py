"""Stage 7: the Triton Inference Server binary shipped in the nvidia-pytriton wheel.

Started by the project on loopback, waited on through the health endpoints and
stopped with SIGTERM. Only the python backend exists in that build, which is why
the ensemble runs TensorFlow inside Merlin's python executor model.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import tritonclient.grpc as grpcclient

from twotower.config import ServeConfig


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
    return env


def server_command(install: TritonInstall, model_repository: Path, backend_dir: Path, config: ServeConfig) -> list[str]:
    return [
        str(install.binary),
        f"--model-repository={model_repository}",
        f"--backend-directory={backend_dir}",
        f"--grpc-address={config.host}",
        f"--grpc-port={config.grpc_port}",
        f"--http-address={config.host}",
        f"--http-port={config.http_port}",
        f"--metrics-address={config.host}",
        f"--metrics-port={config.metrics_port}",
        "--allow-gpu-metrics=false",
        "--disable-auto-complete-config",
    ]


class TritonServer:
    """A running tritonserver process; use as a context manager."""

    def __init__(self, model_repository: Path, work_dir: Path, config: ServeConfig):
        self.config = config
        self.model_repository = Path(model_repository).resolve()
        self.work_dir = Path(work_dir)
        self.log_path = self.work_dir / "tritonserver.log"
        self.process: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.config.host}:{self.config.grpc_port}"

    def start(self) -> "TritonServer":
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"tritonserver already running (pid {self.process.pid})")
        if not (self.model_repository / self.config.model_name / "config.pbtxt").exists():
            raise FileNotFoundError(f"no exported model {self.config.model_name!r} in {self.model_repository}; run the 'export' stage")
        install = find_triton()
        backend_dir = prepare_backends(install, self.work_dir / "backends")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                server_command(install, self.model_repository, backend_dir, self.config),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=server_environment(install),
                start_new_session=True,
            )
        # Its own session keeps Ctrl-C in a terminal or notebook from reaching it; this keeps
        # it from outliving the Python process (or notebook kernel) that started it.
        atexit.register(self.stop)
        self.wait_ready()
        return self

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        client = grpcclient.InferenceServerClient(self.grpc_url)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                if client.is_server_ready() and client.is_model_ready(self.config.model_name):
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"tritonserver not ready after {self.config.startup_timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30.0) -> None:
        atexit.unregister(self.stop)
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

"""Whoever starts tritonserver owns it: signals to a real `twotower serve` / `make serve` take
the server and its python backend stubs with them, busy ports are refused, and readiness
only counts from the process just started."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from twotower.config import PROJECT_ROOT, ServeConfig
from twotower.serving.triton import (
    EXECUTOR_MODEL_SOURCE,
    PortInUse,
    TritonServer,
    check_exported_code,
    check_ports_free,
    child_processes,
    free_ports,
    listening_sockets,
    process_group,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TWOTOWER = PROJECT_ROOT / ".venv" / "bin" / "twotower"
SERVING_LINE = re.compile(r"Triton serving .* on grpc [\d.]+:(\d+) \(http (\d+), metrics (\d+)\)")


def _port_free(port: int) -> bool:
    return not listening_sockets(port)


def _hangup_by_default() -> None:
    """In the child: SIGHUP's default action, as in a terminal's session. A test run started under
    nohup passes SIGHUP on ignored, and `twotower serve` rightly keeps an ignore it inherits."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _start_serving(command: list[str], log: Path) -> tuple[subprocess.Popen, tuple[int, int, int]]:
    """Start ``command`` in a new session (as `setsid` would) and wait for the serving line."""
    with open(log, "w") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=PROJECT_ROOT,
            preexec_fn=_hangup_by_default,
        )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        match = SERVING_LINE.search(log.read_text())
        if match:
            return process, tuple(int(p) for p in match.groups())
        if process.poll() is not None:
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    pytest.fail(f"serve did not come up:\n{log.read_text()[-3000:]}")


def _serve_args(exported) -> list[str]:
    return [
        "--set",
        f"output_dir={exported.output_dir}",
        "--set",
        f"export_dir={exported.export_dir}",
        "--set",
        "serve.top_k=5",
        "--set",
        "serve.grpc_port=0",
        "--set",
        "serve.http_port=0",
        "--set",
        "serve.metrics_port=0",
    ]


def _tritonserver_of(owner: subprocess.Popen) -> int:
    """The tritonserver started by ``owner`` (directly, or by its `twotower serve` child under make)."""
    pending = [owner.pid]
    while pending:
        pid = pending.pop()
        for child in child_processes(pid):
            if Path(f"/proc/{child}/comm").read_text().strip() == "tritonserver":
                return child
            pending.append(child)
    raise AssertionError("no tritonserver under the serving process")


def _assert_all_gone(owner: subprocess.Popen, server_pid: int, ports: tuple[int, ...], within_s: float = 40.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if owner.poll() is not None and not process_group(server_pid) and all(_port_free(p) for p in ports):
            return
        time.sleep(0.2)
    left = [(pid, Path(f"/proc/{pid}/comm").read_text().strip()) for pid in process_group(server_pid)]
    for group in (server_pid, owner.pid):  # a failing test must not leave servers behind either
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    pytest.fail(
        f"after the signal: owner exit code {owner.poll()}, processes left in the server's group {left}, "
        f"ports busy {[p for p in ports if not _port_free(p)]}"
    )


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGKILL], ids=lambda s: signal.Signals(s).name
)
def test_a_signal_to_twotower_serve_takes_the_server_and_its_stubs(exported, tmp_path, signum):
    owner, ports = _start_serving([str(TWOTOWER), "serve", *_serve_args(exported)], tmp_path / "serve.log")
    server_pid = _tritonserver_of(owner)
    assert [Path(f"/proc/{pid}/comm").read_text().strip() for pid in process_group(server_pid)].count(
        "triton_python_b"
    ) >= 1
    os.killpg(owner.pid, signum)  # the whole group of the command, as a terminal or supervisor does
    _assert_all_gone(owner, server_pid, ports)


def test_sigterm_to_make_serve_group_stops_the_server(exported, tmp_path):
    args = " ".join(_serve_args(exported))
    owner, ports = _start_serving(["make", "--no-print-directory", "serve", f"ARGS={args}"], tmp_path / "make.log")
    server_pid = _tritonserver_of(owner)
    os.killpg(owner.pid, signal.SIGTERM)
    _assert_all_gone(owner, server_pid, ports)


def test_a_busy_port_is_refused_naming_its_holder(exported, tmp_path):
    with socket.socket() as decoy:
        decoy.bind(("127.0.0.1", 0))
        decoy.listen()
        port = decoy.getsockname()[1]
        config = ServeConfig(grpc_port=port, http_port=0, metrics_port=0, top_k=5)
        with pytest.raises(
            PortInUse, match=rf"grpc port {port} on 127.0.0.1 is already in use by pid {os.getpid()} \(python"
        ):
            TritonServer(exported.export_dir, tmp_path / "triton", config).start()
    assert not list(tmp_path.glob("triton/tritonserver.log")), "no server may be started when a port is taken"


def test_free_ports_are_distinct_and_free():
    ports = free_ports("127.0.0.1")
    assert len(set(ports.items())) == 3
    check_ports_free("127.0.0.1", ports)


def test_an_export_by_another_version_of_the_package_is_refused_in_one_line(tmp_path):
    """An export keeps the executor model.py of the code that wrote it, and its pickled graph names
    that code's modules: 'serve' refuses one whose model.py is not this package's (an export made
    before the package was split into subpackages, say) and says what to run."""
    model_dir = tmp_path / "triton_models" / "executor_model"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.py").write_text("from twotower.errors import RequestError\n")  # the old layout's
    command = [sys.executable, "-m", "twotower", "--set", f"export_dir={tmp_path / 'triton_models'}"]
    command += ["--set", f"output_dir={tmp_path / 'artifacts'}", "serve"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert line.endswith("(version 1) was exported by another version of twotower: run `twotower export` again"), line
    assert not (tmp_path / "artifacts" / "triton").exists()  # no server was started

    shutil.copy2(EXECUTOR_MODEL_SOURCE, model_dir / "1" / "model.py")  # what this package's export writes
    check_exported_code(model_dir)

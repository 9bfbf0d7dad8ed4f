"""Nothing leaves the machine: a whole small run, its export and a served request, with every
non-loopback resolve or connect refused and recorded (twotower/offline.py), and no process
lingering after it has finished."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import SMALL_RUN

from twotower.config import PROJECT_ROOT, ServeConfig
from twotower.offline import EGRESS_LOG_ENV, is_loopback
from twotower.serving.client import recommend
from twotower.serving.triton import TritonServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

TWOTOWER = PROJECT_ROOT / ".venv" / "bin" / "twotower"


@pytest.mark.unit
@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("::1", True),
        ("localhost", True),
        ("usage.feast.dev", False),
        ("8.8.8.8", False),
        ("10.0.0.1", False),
    ],
)
def test_loopback_is_recognised(host, loopback):
    assert is_loopback(host) is loopback


def test_guard_refuses_and_records_egress(tmp_path):
    log = tmp_path / "egress.log"
    probe = (
        "import socket, twotower\ntry:\n    socket.getaddrinfo('example.org', 443)\nexcept OSError as e:\n    print(e)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, EGRESS_LOG_ENV: str(log)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "egress guard" in result.stdout
    assert "example.org" in log.read_text()


def test_feast_import_writes_no_usage_id_and_prints_no_notice(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEAST_")}
    env["HOME"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", "import twotower, feast.usage"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "usage statistics" not in result.stdout + result.stderr
    assert not (tmp_path / ".feast").exists()


def test_pipeline_export_and_serving_send_nothing_off_the_machine(tmp_path, monkeypatch):
    log = tmp_path / "egress.log"
    env = {**os.environ, EGRESS_LOG_ENV: str(log)}
    env.pop("FEAST_USAGE", None)  # the package itself must turn Feast's telemetry off
    overrides = [*SMALL_RUN, f"output_dir={tmp_path / 'artifacts'}", f"export_dir={tmp_path / 'triton_models'}"]
    command = [str(TWOTOWER), "all", *(arg for o in overrides for arg in ("--set", o))]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last_line_at, output = None, []
    for line in process.stdout:
        output.append(line)
        last_line_at = time.monotonic()
    process.wait(timeout=60)
    exited_after_s = time.monotonic() - last_line_at
    assert process.returncode == 0, "".join(output[-40:])
    assert any(line.startswith("[all] done in") for line in output), "".join(output[-40:])  # the summary follows it
    assert exited_after_s < 10, f"the pipeline lingered {exited_after_s:.1f}s after its last line"

    # The server's python backend stub inherits the guard from this environment.
    monkeypatch.setenv(EGRESS_LOG_ENV, str(log))
    monkeypatch.delenv("FEAST_USAGE", raising=False)
    config = ServeConfig(grpc_port=0, http_port=0, metrics_port=0, top_k=5)
    server = TritonServer(tmp_path / "triton_models", tmp_path / "triton", config).start()
    try:
        answer = recommend(np.array([1, 2, -1]), server.grpc_url)
        assert answer["item_ids"].shape == (3, 5)
    finally:
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 15
    assert not log.exists() or log.read_text() == "", f"attempted to leave the machine:\n{log.read_text()}"

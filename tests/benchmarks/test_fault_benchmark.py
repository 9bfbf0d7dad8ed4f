import dataclasses
import json
import os
import shutil

import pytest

from twotower.benchmarks.faults import run_fault_benchmark

pytestmark = [pytest.mark.smoke, pytest.mark.timeout(600)]


def test_fault_benchmark_smoke_run(exported, tmp_path):
    if shutil.which("redis-server") is None and not os.environ.get("CI"):
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    config = dataclasses.replace(exported, output_dir=tmp_path / "artifacts", export_dir=tmp_path / "triton_models")
    shutil.copytree(exported.output_dir, config.output_dir)
    faults = dataclasses.replace(
        exported.benchmark.faults, gap_s=3.0, soak_seconds=4.0, sample_users=10, concurrency=4, stage_kill_after_s=3.0
    )
    config.benchmark = dataclasses.replace(exported.benchmark, faults=faults)
    report = json.loads(run_fault_benchmark(config).read_text())
    for gap in (report["redis_gap"], report["cluster_node_gap"]):  # one Redis stopped; one node of a cluster
        for phase in ("before", "during", "after"):
            assert gap[phase]["wrong"] == 0 and gap[phase]["hang"] == 0, (phase, gap[phase], gap["wrong"])
        assert gap["before"]["good"] > 0 and gap["after"]["good"] > 0
        assert gap["during"]["clear_error"] > 0
        assert all(m.startswith("online feature store unavailable") for m in gap["gap_error_messages"])
    assert report["triton_sigkill"]["same_answers"]
    assert report["stage_killed"]["same_answers"]
    soak = report["memory_soak"]
    assert soak["good"] > 0 and soak["wrong"] == soak["hang"] == soak["clear_error"] == 0
    programs = {name.split()[0] for name in soak["rss_mb"]["0"]}
    assert {"tritonserver", "triton_python_backend_stub"} <= programs, programs
    assert soak["rss_growth_pct_after_warmup"].keys() == soak["rss_mb"]["0"].keys()
    assert (config.output_dir / "benchmark-faults" / "faults.png").stat().st_size > 0

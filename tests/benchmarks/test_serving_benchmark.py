import dataclasses
import json

import pytest

from twotower.benchmarks.serving import run_serving_benchmark

pytestmark = [pytest.mark.smoke, pytest.mark.timeout(900)]


def test_serving_benchmark_smoke_run_writes_its_report(exported):
    config = dataclasses.replace(exported)
    config.serve = dataclasses.replace(exported.serve, grpc_port=0, http_port=0, metrics_port=0)
    serving = dataclasses.replace(
        exported.benchmark.serving, requests_per_phase=20, warmup_requests=5, soak_seconds=2.0, soak_concurrency=4
    )
    config.benchmark = dataclasses.replace(exported.benchmark, serving=serving)
    report = json.loads(run_serving_benchmark(config).read_text())
    for phase in ("c1", "c4", "c16", "batch64_c1"):
        for graph in ("recipe", "reference"):
            result = report["phases"][phase][graph]
            assert result["errors"] == 0 and result["p50_ms"] > 0 and result["qps"] > 0
    assert report["soak"]["good_errors"] == 0 and report["soak"]["ready_after"]
    assert report["soak"]["bad_rejected"] == report["soak"]["bad"]
    assert report["in_process"]["recipe"]["p50_ms"] > 0 and report["in_process"]["reference"]["p50_ms"] > 0

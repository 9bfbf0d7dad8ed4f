import dataclasses
import json

import pytest

from twotower.benchmarks.serving import run_serving_benchmark

pytestmark = [pytest.mark.smoke, pytest.mark.timeout(900)]


def test_serving_benchmark_smoke_run_writes_its_report(exported):
    config = dataclasses.replace(exported)
    config.serve = dataclasses.replace(exported.serve, grpc_port=0, http_port=0, metrics_port=0)
    serving = dataclasses.replace(
        exported.benchmark.serving,
        requests_per_phase=20,
        warmup_requests=5,
        soak_seconds=2.0,
        soak_concurrency=4,
        queue_delays_us=[-1, 0],
        instance_counts=[1, 2],
        breakdown_requests=20,
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
    assert report["settings"] == {"dynamic_batching": True, "max_queue_delay_us": 100, "instance_count": 1}
    delays, instances = report["settings_sweep"]["queue_delay_us"], report["settings_sweep"]["instance_count"]
    assert delays.keys() == {"off", "0us"} and instances.keys() == {"1", "2"}
    assert delays["off"]["c16"]["requests_per_execution"] == 1.0  # without the batcher, one request an execution
    points = [*delays.values(), *instances.values()]
    assert all(point[c]["errors"] == 0 and point[c]["users_per_s"] > 0 for point in points for c in ("c1", "c16"))
    stages = report["breakdown_ms"]
    assert {"feature_store_read", "query_tower", "index_search", "graph_overhead", "triton_and_grpc"} <= stages.keys()
    assert all(stages[name] > 0 for name in ("feature_store_read", "query_tower", "index_search"))
    parts = sum(ms for name, ms in stages.items() if name not in ("in_process_total", "triton_and_grpc"))
    assert parts == pytest.approx(stages["in_process_total"], rel=0.5)  # medians of parts roughly add up

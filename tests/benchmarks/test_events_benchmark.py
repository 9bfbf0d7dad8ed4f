import dataclasses
import json

import pytest

from twotower.benchmarks.events import run_events_benchmark

pytestmark = [pytest.mark.smoke, pytest.mark.timeout(900)]


def _run_log(config) -> bytes:
    path = config.events_dir / "log.jsonl"
    return path.read_bytes() if path.exists() else b""


def test_events_benchmark_smoke_run_writes_its_report(exported):
    config = dataclasses.replace(exported, serve=dataclasses.replace(exported.serve, client_timeout_s=30.0))
    config.benchmark = dataclasses.replace(
        exported.benchmark,
        events=dataclasses.replace(
            exported.benchmark.events,
            requests=200,
            event_batch_rows=8,
            changed_answer_users=10,
            models=["two_tower"],
            max_targets=300,
        ),
    )
    events_logged = (
        (exported.events_dir / "log.jsonl").read_bytes() if (exported.events_dir / "log.jsonl").exists() else b""
    )
    report = json.loads(run_events_benchmark(config).read_text())

    load = report["under_load"]
    assert all(load[phase]["errors"] == 0 and load[phase]["qps"] > 0 for phase in load)
    assert load.keys() == {"recommend", *(f"{p}x{n}" for p in ("recommend_with_events_", "events_") for n in (1, 8))}
    assert load["recommend"]["requests"] == load["recommend_with_events_x8"]["requests"] == 200
    assert load["events_x8"]["users_per_s"] == pytest.approx(8 * load["events_x8"]["qps"])
    changed = report["event_to_changed_answer"]
    assert changed["changed_on_first_request"] == changed["users"] == 10  # the next request sees the event
    fresh = report["freshness"]["two_tower"]
    assert fresh["targets"] > 0 and fresh["first_targets_ranked_alike"] == 1.0
    # seen items alone can only help: the same scores, fewer items ahead of the target
    assert fresh["live_seen_items_only"]["hr@10"] >= fresh["as_of_training"]["hr@10"]
    assert fresh["live_seen_items_only"]["ndcg@10"] >= fresh["as_of_training"]["ndcg@10"]
    assert _run_log(exported) == events_logged, "the benchmark's events went into the run's own log (training data)"

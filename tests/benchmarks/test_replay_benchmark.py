import json

import pytest
from conftest import small_config

from twotower.benchmarks.replay import FULL, STALE, incremental_arm, run_replay_benchmark

pytestmark = [pytest.mark.smoke, pytest.mark.timeout(900)]


def test_replay_benchmark_smoke_run_scores_each_retrain_on_the_next_slice(tmp_path, capsys):
    config = small_config(
        tmp_path,
        "train.epochs=2",
        "train.retrain_epochs=1",
        "benchmark.replay.steps=1",
        "benchmark.replay.slice=0.1",
        "benchmark.replay.start=0.7",
        "benchmark.replay.ratios=[1.0]",
        "benchmark.replay.test_fraction=0.2",
        "benchmark.replay.validation_fraction=0.1",
    )
    path = run_replay_benchmark(config)
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(path)
    assert (path.parent / "replay.png").stat().st_size > 0
    report = json.loads(path.read_text())
    cutoffs = report["cutoffs"]
    assert len(cutoffs) == 3 and cutoffs == sorted(cutoffs)
    rows = {(row["step"], row["arm"]): row for row in report["rows"]}
    incremental = incremental_arm(1.0)
    assert set(rows) == {(step, arm) for step in (0, 1) for arm in (incremental, FULL, STALE)}
    first = rows[(0, FULL)]
    assert all(rows[(0, arm)]["recall@10"] == first["recall@10"] for arm in (incremental, STALE))  # one first model
    assert rows[(1, incremental)]["replayed"] == rows[(1, incremental)]["trained_positives"] > 0
    for row in report["rows"]:
        assert 0.0 <= row["recall@10"] <= row["recall@100"] <= 1.0
        assert (row["wall_seconds"] is None) == (row["arm"] != FULL and row["step"] == 0 or row["arm"] == STALE)

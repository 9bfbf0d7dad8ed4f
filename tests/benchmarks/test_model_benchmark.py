import json

import pytest
from conftest import small_config

from twotower.benchmarks.models import VARIANTS, run_model_benchmark

pytestmark = [pytest.mark.smoke, pytest.mark.timeout(900)]

REQUIRED = ("recall@10", "recall@100", "ndcg@10", "serving_p50_ms", "params", "seconds_per_epoch", "seeds")


def test_model_benchmark_smoke_run_writes_its_report(tmp_path, capsys):
    config = small_config(
        tmp_path,
        "train.epochs=1",
        "benchmark.models.variants=[two_tower, dat]",
        "benchmark.models.extra_seeds=[43]",
        "benchmark.models.serving_requests=20",
        "benchmark.serving.warmup_requests=3",
    )
    path = run_model_benchmark(config)
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(path)
    report = json.loads(path.read_text())
    assert set(report["models"]) == {"two_tower", "dat", "popularity", "ease"}
    for name, row in report["models"].items():
        assert set(REQUIRED) <= set(row), name
        assert 0.0 <= row["recall@10"] <= row["recall@100"] <= 1.0
    for name in ("two_tower", "dat"):
        row = report["models"][name]
        assert row["serving_p50_ms"] > 0 and row["params"] > 0 and row["seconds_per_epoch"] > 0
        # every setting of the variant was tried, and the row is the best on validation
        assert [run["settings"] for run in report["tried"][name]] == VARIANTS[name]
        assert row["validation"] == max(run["validation"] for run in report["tried"][name])
    assert report["models"]["dat"]["params"] > report["models"]["two_tower"]["params"]  # the augmented vectors
    (repeated,) = report["seed_repeats"].values()
    assert len(repeated["runs"]) == 2
    assert (path.parent / "tradeoff.png").stat().st_size > 0

import json

import pytest
from conftest import small_config

from twotower.benchmarks.models import VARIANTS, run_model_benchmark

pytestmark = [pytest.mark.smoke, pytest.mark.timeout(900)]

REQUIRED = ("recall@10", "recall@100", "ndcg@10", "serving_p50_ms", "params", "seconds_per_epoch", "seeds")


def test_model_benchmark_serves_each_row_repeats_seeds_and_measures_the_cascade_with_both_prerankers(tmp_path, capsys):
    """One run covers the report's every part: rows served through Triton (inttower by its
    multi-vector graph), the ranking model not served alone, a seed repeat, the cascade."""
    config = small_config(
        tmp_path,
        "train.epochs=1",
        "benchmark.models.variants=[two_tower, inttower, dcn_v2]",
        "benchmark.models.extra_seeds=[43]",
        "benchmark.models.serving_requests=20",
        "benchmark.serving.warmup_requests=3",
        "benchmark.models.cascade_candidates=20",
        "serve.top_k=10",  # the served top 10 is what the rows' recall@10 and ndcg@10 rank
        "model.inttower.search_depth=100000",  # covers every item head: the retriever must equal exact scoring
    )
    path = run_model_benchmark(config)
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == str(path)
    report = json.loads(path.read_text())
    assert set(report["models"]) == {"two_tower", "inttower", "dcn_v2", "popularity", "ease"}
    for name, row in report["models"].items():
        assert set(REQUIRED) <= set(row), name
        assert 0.0 <= row["recall@10"] <= row["recall@100"] <= 1.0
    for name in ("two_tower", "inttower", "dcn_v2"):
        row = report["models"][name]
        assert row["params"] > 0 and row["seconds_per_epoch"] > 0
        # every setting of the variant was tried, and the row is the best on validation
        assert [run["settings"] for run in report["tried"][name]] == VARIANTS[name]
        assert row["validation"] == max(run["validation"] for run in report["tried"][name])
    assert report["models"]["inttower"]["params"] > report["models"]["two_tower"]["params"]  # the FE heads
    (repeated,) = report["seed_repeats"].values()
    assert len(repeated["runs"]) == 2
    assert (path.parent / "tradeoff.png").stat().st_size > 0

    row = report["models"]["inttower"]
    assert row["serving_p50_ms"] > 0 and report["models"]["two_tower"]["serving_p50_ms"] > 0
    found = row["multi_vector"]
    assert found["overlap@10"] == 1.0 and found["overlap@100"] == 1.0
    assert found["recall@10"] == pytest.approx(row["recall@10"]) and found["recall@100"] == pytest.approx(
        row["recall@100"]
    )
    assert found["ms_per_user"] > 0
    assert report["models"]["dcn_v2"]["serving_p50_ms"] is None  # the ranking model is not served as a retriever

    cascade = report["cascade"]
    assert set(cascade) == {"retrieval_only", "with_prerank", "with_prerank_dcn_v2"}
    for stage in cascade.values():
        assert set(stage) >= {"recall@10", "ndcg@10", "p50_ms", "latency"}
        assert stage["p50_ms"] > 0 and stage["latency"]["c16"]["errors"] == 0
    # the served two-tower graph over the whole test split scores what the row's in-process metrics do
    for metric in ("recall@10", "ndcg@10"):
        assert cascade["retrieval_only"][metric] == pytest.approx(report["models"]["two_tower"][metric], abs=1e-6)
    assert cascade["with_prerank"]["candidates"] == 20 and cascade["with_prerank"]["prerank_model"] == "inttower"
    assert cascade["with_prerank_dcn_v2"]["prerank_model"] == "dcn_v2"
    assert "cascade (served, every test user" in out

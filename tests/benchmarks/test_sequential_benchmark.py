"""benchmark-sequential: the public protocol's pieces by hand, and a small run end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import small_config

from twotower.benchmarks.sequential import (
    METRICS,
    PUBLISHED,
    length_batches,
    padded,
    popularity_scores,
    ranking_metrics,
    ranks,
    run_sequential_benchmark,
    user_sequences,
)

pytestmark = [pytest.mark.smoke, pytest.mark.timeout(600)]


def test_sequences_are_ordered_by_time_with_ties_in_file_order():
    interactions = pd.DataFrame(
        {
            "user_id": [1, 1, 1, 1, 2, 2, 3, 3, 3],
            "item_id": [30, 10, 20, 40, 10, 20, 40, 30, 10],
            "timestamp": [5, 9, 5, 1, 1, 2, 7, 7, 3],
        }
    )
    sequences = user_sequences(interactions)
    assert sequences.catalogue == 4  # item ids 10, 20, 30, 40 -> codes 1..4
    # user 1: 40 (t1), then 30 and 20 tied at t5 in file order, then 10; user 2 has only 2 items: dropped
    assert [items.tolist() for items in sequences.items] == [[4, 3, 2, 1], [1, 4, 3]]
    assert [times.tolist() for times in sequences.times] == [[1, 5, 5, 9], [3, 7, 7]]
    assert [items.tolist() for items in sequences.cut(2).items] == [[4, 3], [1]]


def test_padding_keeps_the_latest_items_left_aligned():
    rows = [np.array([1, 2, 3, 4, 5]), np.array([7])]
    np.testing.assert_array_equal(padded(rows, 3, np.int32), [[3, 4, 5], [7, 0, 0]])
    batches = length_batches(np.array([5, 1, 4, 2]), 2, None)
    assert [batch.tolist() for batch in batches] == [[1, 3], [2, 0]]  # similar lengths together


def test_ranks_exclude_earlier_items_and_metrics_by_hand():
    scores = np.array([[0.9, 0.8, 0.1, 0.5], [0.1, 0.2, 0.3, 0.4]])
    # row 0: target code 3 (score 0.1), seen code 1 excluded: items 2 and 4 above it -> rank 2
    # row 1: target code 4 is the best -> rank 0
    target_ranks = ranks(scores, [np.array([1]), np.array([4, 1])], np.array([3, 4]))
    np.testing.assert_array_equal(target_ranks, [2, 0])
    metrics = ranking_metrics(np.array([0, 2, 10, 60]))
    assert metrics["hr@10"] == 0.5 and metrics["hr@50"] == 0.75 and metrics["hr@200"] == 1.0
    assert metrics["ndcg@10"] == pytest.approx((1.0 + 1.0 / np.log2(4)) / 4)
    assert metrics["ndcg@200"] == pytest.approx((1.0 + 1.0 / np.log2(4) + 1.0 / np.log2(12) + 1.0 / np.log2(62)) / 4)


def test_popularity_counts_training_items_only():
    sequences = user_sequences(
        pd.DataFrame({"user_id": [1, 1, 1, 2, 2, 2], "item_id": [1, 1, 2, 3, 3, 3], "timestamp": range(6)})
    )
    scores = popularity_scores(sequences.cut(1))([0, 1], sequences)
    np.testing.assert_array_equal(scores, [[2, 0, 2], [2, 0, 2]])


def test_benchmark_run_reports_every_row_beside_the_published_ones(tmp_path, capsys):
    config = small_config(
        tmp_path,
        "benchmark.sequential.models=[popularity,two_tower,seq_hstu]",
        "benchmark.sequential.max_epochs=2",
        "benchmark.sequential.eval_every=1",
        "benchmark.sequential.max_length=20",
        "benchmark.sequential.embedding_dim=16",
    )
    path = run_sequential_benchmark(config)
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(path)
    assert (path.parent / "hr10_against_training_time.png").stat().st_size > 0
    report = json.loads(path.read_text())
    assert list(report["rows"]) == ["popularity", "two_tower", "seq_hstu"] and report["published"] == PUBLISHED
    for name, row in report["rows"].items():
        assert {*METRICS, "seconds_per_epoch", "epochs", "params"} <= set(row)
        assert 0.0 <= row["hr@10"] <= row["hr@50"] <= row["hr@200"] <= 1.0
        assert row["ndcg@10"] <= row["hr@10"]
        assert (row["params"] > 0) == (name != "popularity")
    assert report["rows"]["seq_hstu"]["epochs"] == 2 and len(report["rows"]["seq_hstu"]["curve"]) == 2


def test_unknown_rows_are_refused_before_any_work(tmp_path):
    config = small_config(tmp_path, "benchmark.sequential.models=[sasrec]")
    with pytest.raises(ValueError, match="unknown \\['sasrec'\\]"):
        run_sequential_benchmark(config)
    assert not (config.output_dir / "benchmark-sequential").exists()

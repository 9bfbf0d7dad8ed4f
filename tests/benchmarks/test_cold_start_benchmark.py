import json

import numpy as np
import pytest
from conftest import small_config

from twotower.benchmarks.cold_start import run_cold_start_benchmark
from twotower.config import RecipeConfig
from twotower.store.artifacts import load_split
from twotower.store.manifest import REFRESH, read_manifest

pytestmark = [pytest.mark.smoke, pytest.mark.timeout(900)]


def test_cold_start_benchmark_smoke_run_holds_out_the_newest_items_and_refreshes_them_in(tmp_path, capsys):
    config = small_config(tmp_path, "train.epochs=2", "benchmark.cold_start.share=0.1")
    path = run_cold_start_benchmark(config)
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(path)
    report = json.loads(path.read_text())
    held_out = np.array(report["held_out"]["items"])
    assert len(held_out) == 12 and report["held_out"]["test_positives"] > 0

    trained, cold = report["runs"]["trained normally"], report["runs"]["cold start (refresh-items)"]
    assert trained["catalogue_items"] == cold["catalogue_items"] == 120  # the same items ranked in both
    for run in (trained, cold):
        for part in ("held_out_items", "all_items"):
            assert 0.0 <= run[part]["recall@10"] <= run[part]["recall@100"] <= 1.0
    # the cold run never saw them before the test period; refresh-items added exactly them
    cold = RecipeConfig(output_dir=tmp_path / "artifacts" / "benchmark-cold-start" / "cold_start")
    split = load_split(cold.splits_dir)
    assert not split.train["item_id"].isin(held_out).any() and not split.valid["item_id"].isin(held_out).any()
    assert split.test["item_id"].isin(held_out).any()
    (added,) = read_manifest(cold)[REFRESH]["added"]
    assert sorted(added["item_ids"]) == sorted(held_out.tolist())

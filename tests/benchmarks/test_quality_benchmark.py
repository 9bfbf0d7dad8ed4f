import json

import pytest
from conftest import small_config

from twotower.benchmarks.quality import run_quality_benchmark

pytestmark = [pytest.mark.smoke, pytest.mark.timeout(900)]

METRICS = ("recall@10", "recall@20", "recall@50", "recall@100", "ndcg@10", "mrr@100", "coverage@10")


def test_quality_benchmark_smoke_run_writes_its_report(tmp_path, capsys):
    config = small_config(tmp_path, "train.epochs=2")
    path = run_quality_benchmark(config, ablations=False)
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(path)
    report = json.loads(path.read_text())
    assert set(report["configs"]) == {"popularity", "ease", "reference", "tuned"}
    for name, values in report["configs"].items():
        assert all(0.0 <= values[m] <= 1.0 for m in METRICS), name
    assert report["configs"]["reference"]["settings"]["epochs"] == 1
    assert report["configs"]["tuned"]["seconds_per_epoch"] > 0
    assert (path.parent / "recall_at_k.png").exists() and (path.parent / "training_loss.png").exists()

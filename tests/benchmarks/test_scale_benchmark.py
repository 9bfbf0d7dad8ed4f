import dataclasses
import json
import shutil

import numpy as np
import pytest
from conftest import small_config

from twotower.benchmarks.faults import run_fault_benchmark
from twotower.benchmarks.harness import BenchmarkRefused
from twotower.benchmarks.scale import grown_catalogue, replicated_users, run_scale_benchmark

KIND_KEYS = (
    "recall@10",
    "recall@100",
    "bytes_per_item",
    "build_s",
    "p50_ms_in_process",
    "p50_ms_triton",
    "p99_ms_triton",
)


@pytest.mark.unit
def test_grown_catalogue_keeps_the_real_items_and_their_neighbourhoods():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 16)).astype(np.float32)
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    real_ids = np.arange(200) * 5 + 3
    ids, vectors = grown_catalogue(real_ids, real, 5000, seed=1)
    assert len(ids) == len(vectors) == 5000 and len(np.unique(ids)) == 5000
    np.testing.assert_array_equal(ids[:200], real_ids)
    np.testing.assert_array_equal(vectors[:200], real)
    assert ids[200:].min() > real_ids.max()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    # each copy is a new point near a real item: the real catalogue's own neighbour distance away
    nearest = (vectors[200:] @ real.T).max(axis=1)
    real_nearest = np.sort(real @ real.T, axis=1)[:, -2]  # each real item's nearest other item
    assert nearest.max() < 0.999
    assert abs(np.median(nearest) - np.median(real_nearest)) < 0.2
    assert np.median(nearest) > 0.5 > np.median(vectors[200:] @ real[0])
    with pytest.raises(ValueError, match="holds the 200 real items"):
        grown_catalogue(real_ids, real, 100, seed=1)


@pytest.mark.unit
def test_replicated_users_repeat_rows_under_new_unique_ids():
    import pandas as pd

    from twotower.stages.features import FeatureTables

    users = pd.DataFrame({"user_id": [10, 20], "age": [1, 2]})
    encoded = pd.DataFrame({"user_id": [1, 2], "age": [3, 4]})
    tables = FeatureTables(None, users, encoded, "fingerprint", {})
    many, many_encoded = replicated_users(tables, 5)
    assert many["user_id"].tolist() == [1, 2, 3, 4, 5]
    assert many["age"].tolist() == [1, 2, 1, 2, 1] and many_encoded["age"].tolist() == [3, 4, 3, 4, 3]


@pytest.mark.smoke
@pytest.mark.timeout(900)
def test_scale_benchmark_smoke_run_writes_the_issue_schema(exported, capsys):
    config = dataclasses.replace(exported)
    config.index = dataclasses.replace(exported.index, recall_queries=60)
    bench = exported.benchmark
    config.benchmark = dataclasses.replace(
        bench,
        scale=dataclasses.replace(bench.scale, sizes=[2000], feast_users=[500], requests=15),
        serving=dataclasses.replace(bench.serving, warmup_requests=3),
    )
    path = run_scale_benchmark(config)
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(path)
    report = json.loads(path.read_text())
    kinds = report["sizes"]["2000"]
    assert set(kinds) == {"flat", "hnsw", "ivf_flat"}  # ivf_pq cannot train on 2,000 items
    for kind, row in kinds.items():
        assert set(KIND_KEYS) <= set(row), kind
        assert 0.0 <= row["recall@10"] <= 1.0 and 0.0 <= row["recall@100"] <= 1.0
        assert row["p50_ms_triton"] > 0 and row["p99_ms_triton_c16"] >= row["p50_ms_triton_c16"] > 0
        assert row["memory_bytes"] > 0
    assert kinds["flat"]["recall@100"] == 1.0
    assert report["auto"]["2000"] in kinds
    for store in ("sqlite", "redis"):
        assert set(report["feast"][store]["500"]) >= {"materialize_s", "read_p50_ms"}
    assert (path.parent / "scale.png").stat().st_size > 0


@pytest.mark.unit
@pytest.mark.parametrize("benchmark", [run_scale_benchmark, run_fault_benchmark])
def test_a_benchmark_that_needs_redis_refuses_before_any_work_without_it(tmp_path, monkeypatch, benchmark):
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))  # no redis-server on it
    config = small_config(tmp_path)
    with pytest.raises(BenchmarkRefused, match=r"^redis-server is not installed"):
        benchmark(config)
    assert not any(tmp_path.iterdir()), "the refused benchmark wrote something"


@pytest.mark.unit
def test_the_fault_benchmark_refuses_before_any_work_without_redis_cli(tmp_path, monkeypatch):
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "redis-server").symlink_to(shutil.which("redis-server") or "/bin/true")  # a server, no cli
    monkeypatch.setenv("PATH", str(tools))
    config = small_config(tmp_path / "run")
    with pytest.raises(BenchmarkRefused, match=r"^redis-cli is not installed"):
        run_fault_benchmark(config)
    assert not (tmp_path / "run").exists(), "the refused benchmark wrote something"

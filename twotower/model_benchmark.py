"""``make benchmark-models``: the two-tower family side by side on one protocol.

Every model of the registry and every learning approach, plus popularity and EASE, on the
per-user temporal split, ranked over the whole catalogue with earlier positives excluded.
Each variant tries a handful of settings (its first is the default); the one with the best
validation metric (``train.early_stopping_metric``) is its row, the test split is only
reported. Each row's model is then exported and served by a real Triton server started
here, and single-user requests at concurrency 1 measure its serving latency (a model the
graph does not serve yet, ``inttower``, records why instead). ``inttower``'s row also measures
its multi-vector FAISS retrieval against its exact scoring. The best rows are trained again
with other seeds to show the spread.

Data and workflow are prepared once and copied into each run's own output folder, so
every run has its own complete, exportable artifacts.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from datetime import date
from pathlib import Path

import numpy as np

from twotower import pipeline
from twotower.config import RecipeConfig, config_to_dict, set_value
from twotower.evaluate import RECALL_KS

# variant -> settings tried (the first is the variant's default); each a dict of overrides
VARIANTS: dict[str, list[dict]] = {
    "two_tower": [{}],
    "two_tower+senet": [{"model.gating": "senet"}],
    "two_tower+light_se": [{"model.gating": "light_se"}],
    "dat": [
        {"model.name": "dat"},
        {"model.name": "dat", "model.dat.alignment_weight": 0.0},
        {"model.name": "dat", "model.dat.user_mimic_weight": 0.0, "model.dat.item_mimic_weight": 0.0},
    ],
    "seq_attention": [{"model.name": "seq_attention"}, {"model.name": "seq_attention", "model.sequence.dropout": 0.3}],
    "seq_gru": [{"model.name": "seq_gru"}],
    "inttower": [{"model.name": "inttower"}],
    "two_tower/bpr": [{"model.loss": "bpr"}],
    "two_tower/bce": [{"model.loss": "bce"}],
}
COLUMNS = [*(f"recall@{k}" for k in RECALL_KS), "ndcg@10", "mrr@100", "coverage@10"]
DATA_PARTS = ("data", "workflows", "manifest.json")


def _slug(name: str) -> str:
    return name.replace("/", "_").replace("+", "_")


def run_folder(base: RecipeConfig, shared: RecipeConfig, run_name: str, overrides: dict, seed: int) -> RecipeConfig:
    """A run folder holding a copy of the shared data and workflow, with ``overrides`` set."""
    config = copy.deepcopy(base)
    config.seed = seed
    config.output_dir = base.output_dir / "benchmark-models" / "runs" / run_name
    config.export_dir = config.output_dir / "triton_models"
    for key, value in overrides.items():
        set_value(config, key, value)
    if config.output_dir.exists():
        shutil.rmtree(config.output_dir)
    config.output_dir.mkdir(parents=True)
    for part in DATA_PARTS:
        source = shared.output_dir / part
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, config.output_dir / part)
    return config


def _train(config: RecipeConfig) -> dict:
    from twotower.models.inttower import IntTowerRetrievalModel
    from twotower.train import train_and_save

    started = time.perf_counter()
    model, metrics = train_and_save(config, verbose=2)
    history = metrics["history"]
    validation = f"val_{config.train.early_stopping_metric}"
    wall_seconds = time.perf_counter() - started
    multi_vector = {"multi_vector": _multi_vector_retrieval(config, model)} if isinstance(model, IntTowerRetrievalModel) else {}
    return {
        **metrics["test"][config.model.name],
        "validation": max(h[validation] for h in history),
        "params": model.parameter_count(),
        "seconds_per_epoch": float(np.median([h["train_seconds"] for h in history])),
        "epochs_run": len(history),
        "best_epoch": metrics["best_epoch"],
        "wall_seconds": wall_seconds,
        **multi_vector,
    }


def _multi_vector_retrieval(config: RecipeConfig, model) -> dict[str, float]:
    """An IntTower model's test split retrieved through FAISS over item heads
    (``twotower/multi_vector.py``, depth ``model.inttower.search_depth``): its Recall@10/100 and
    how much of the exact full-catalogue FE top 10/100 it finds (the row's own metrics are exact)."""
    from twotower.evaluate import ranking_metrics, top_k_positions
    from twotower.multi_vector import multi_vector_top_k, overlap_at_k
    from twotower.train import load_training_inputs, held_out_eval_set

    inputs = load_training_inputs(config)
    test_set = held_out_eval_set(inputs)
    users = model.query_vectors(inputs.test_users.loc[test_set.user_ids])
    items = model.item_vectors(inputs.catalogue.features)
    k = min(max(RECALL_KS), len(items))
    exact = top_k_positions(lambda rows: model.score(users[rows], items), test_set, k)
    layout, depth = model.keras.layout, config.model.inttower.search_depth
    started = time.perf_counter()
    found = multi_vector_top_k(layout.query(users).numpy(), layout.items(items).numpy(), k, depth, test_set.seen)
    seconds = time.perf_counter() - started
    metrics = ranking_metrics(found, test_set)
    return {
        "search_depth": depth,
        **{name: metrics[name] for name in ("recall@10", "recall@100") if name in metrics},
        **{f"overlap@{n}": overlap_at_k(found, exact, n) for n in (10, 100) if n <= k},
        "ms_per_user": 1000 * seconds / len(users),
    }


def _serving_latency(config: RecipeConfig) -> dict[str, float | str | None]:
    """Index, feature store and export of this run, then single-user requests at concurrency 1
    through a Triton server started here on free ports; for a model the graph does not serve
    (``twotower.models.NOT_SERVED``), no latency and the reason."""
    from twotower.data import load_split
    from twotower.models import NotServed, check_served
    from twotower.serve import TritonServer
    from twotower.serving_benchmark import drive_requests, latency_summary, user_batches

    try:
        check_served(config.model.name)
    except NotServed as error:  # recorded in the row instead of a latency
        print(f"[benchmark-models] {error}", flush=True)
        return {"serving_p50_ms": None, "serving_p99_ms": None, "not_served": str(error)}
    pipeline.run_index(config)
    pipeline.run_features(config)
    pipeline.run_export(config)
    users = load_split(config.splits_dir).test["user_id"].unique()
    serve = dataclasses.replace(config.serve, grpc_port=0, http_port=0, metrics_port=0)
    requests = config.benchmark.model_serving_requests
    with TritonServer(config.export_dir, config.output_dir / "triton", serve) as server:
        timeout = config.serve.client_timeout_s
        drive_requests(server.grpc_url, serve.model_name, user_batches(users, config.benchmark.warmup_requests, 1, config.seed), 1, timeout)
        latencies, errors, wall = drive_requests(server.grpc_url, serve.model_name, user_batches(users, requests, 1, config.seed + 1), 1, timeout)
    summary = latency_summary(latencies, errors, wall, 1)
    if errors:
        raise RuntimeError(f"{errors} of {requests} requests failed while measuring {config.output_dir.name}")
    return {"serving_p50_ms": summary["p50_ms"], "serving_p99_ms": summary["p99_ms"]}


def _table(rows: dict[str, dict]) -> str:
    header = f"{'model':<22}" + "".join(f"{c:>12}" for c in COLUMNS) + f"{'p50 ms':>9}{'params':>11}{'s/epoch':>9}{'epochs':>8}"
    lines = [header]
    for name, row in rows.items():
        p50 = row.get("serving_p50_ms")
        per_epoch = row.get("seconds_per_epoch")
        lines.append(
            f"{name:<22}" + "".join(f"{row[c]:>12.4f}" for c in COLUMNS)
            + (f"{p50:>9.2f}" if p50 is not None else f"{'-':>9}")
            + f"{row['params']:>11,}"
            + (f"{per_epoch:>9.1f}{row['epochs_run']:>8}" if per_epoch is not None else f"{'-':>9}{'-':>8}")
        )
    return "\n".join(lines)


def _spread(runs: list[dict]) -> dict[str, dict[str, float]]:
    return {c: {"mean": float(np.mean([r[c] for r in runs])), "std": float(np.std([r[c] for r in runs]))} for c in ("recall@10", "recall@100", "ndcg@10")}


def run_model_benchmark(base: RecipeConfig) -> Path:
    from twotower.plots import plot_model_tradeoff
    from twotower.quality import baselines

    bench = base.benchmark
    out_dir = base.output_dir / "benchmark-models"
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    names = bench.model_variants or list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise ValueError(f"benchmark.model_variants: unknown {unknown}; known: {', '.join(VARIANTS)}")

    shared = copy.deepcopy(base)
    shared.output_dir = out_dir / "shared"
    print(f"[benchmark-models] data and workflow once, in {shared.output_dir}")
    pipeline.run_data(shared)
    pipeline.run_workflow(shared)

    rows, tried = {}, {}
    total_runs = sum(len(VARIANTS[n]) for n in names)
    done = 0
    for name in names:
        tried[name] = []
        for number, overrides in enumerate(VARIANTS[name]):
            done += 1
            print(f"\n[benchmark-models] run {done}/{total_runs}: {name} setting {number} {overrides or '(defaults)'}", flush=True)
            config = run_folder(base, shared, f"{_slug(name)}-{number}", overrides, base.seed)
            tried[name].append({"settings": overrides, "config": config, **_train(config)})
        best = max(tried[name], key=lambda run: run["validation"])
        print(f"[benchmark-models] {name}: chose {best['settings'] or '(defaults)'} on validation; serving it", flush=True)
        rows[name] = {**{k: v for k, v in best.items() if k != "config"}, **_serving_latency(best["config"]), "seeds": [base.seed]}

    seed_runs = {}
    for name in sorted(rows, key=lambda n: -rows[n]["validation"])[: bench.model_seed_rows]:
        settings = rows[name]["settings"]
        runs = [rows[name]]
        for seed in bench.model_extra_seeds:
            print(f"\n[benchmark-models] {name} again with seed {seed}", flush=True)
            runs.append({**_train(run_folder(base, shared, f"{_slug(name)}-seed{seed}", settings, seed)), "seed": seed})
        rows[name]["seeds"] = [base.seed, *bench.model_extra_seeds]
        seed_runs[name] = {"runs": [{c: r[c] for c in COLUMNS} for r in runs], "spread": _spread(runs)}

    reference = tried[names[0]][0]["config"]  # any run: they share data, split and catalogue
    for baseline, values in baselines(reference).items():
        # Not trained by gradient descent and not served: no epochs, no serving latency.
        rows[baseline] = {**values, "seeds": [], "serving_p50_ms": None, "serving_p99_ms": None, "seconds_per_epoch": None}

    report = {
        "date": date.today().isoformat(),
        "dataset": base.data.dataset,
        "protocol": "per-user temporal holdout (latest 20% of positives), full catalogue, earlier positives excluded",
        "selection": f"each variant's setting with the best validation {base.train.early_stopping_metric}",
        "models": rows,
        "tried": {name: [{k: v for k, v in run.items() if k != "config"} for run in runs] for name, runs in tried.items()},
        "seed_repeats": seed_runs,
        "base_config": config_to_dict(base),
        "total_seconds": time.perf_counter() - started,
    }
    json_path = out_dir / "models.json"
    json_path.write_text(json.dumps(report, indent=2, default=float))
    plot_model_tradeoff(rows, out_dir / "tradeoff.png")
    print("\n" + _table(rows))
    for name, spread in seed_runs.items():
        print(f"{name} over seeds {rows[name]['seeds']}: " + ", ".join(f"{c} {v['mean']:.4f} ± {v['std']:.4f}" for c, v in spread["spread"].items()))
    for name, row in rows.items():
        if "multi_vector" in row:
            found = row["multi_vector"]
            print(f"{name} through FAISS over item heads (depth {found['search_depth']}): " + ", ".join(f"{key} {value:.4f}" for key, value in found.items() if key != "search_depth"))
        if row.get("not_served"):
            print(f"{name} not served: {row['not_served']}")
    print(f"total {report['total_seconds'] / 60:.1f} min; plot {out_dir / 'tradeoff.png'}")
    print(json_path)
    return json_path

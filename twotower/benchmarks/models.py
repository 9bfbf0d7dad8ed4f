"""``make benchmark-models``: the two-tower family side by side on one protocol.

Every model of the registry and every learning approach, plus popularity and EASE, on the
per-user temporal split, ranked over the whole catalogue with earlier positives excluded.
Each variant tries a handful of settings (its first is the default); the one with the best
validation metric (``train.early_stopping_metric``) is its row, the test split is only
reported. Each row's model is then exported and served by a real Triton server started
here, and single-user requests at concurrency 1 measure its serving latency (not the ranking
model ``dcn_v2``'s, which serves as a pre-ranker only). ``inttower``'s row also measures its
multi-vector FAISS retrieval against its exact scoring. With the ``two_tower`` row and an
``inttower`` or ``dcn_v2`` row, the cascade is measured through Triton: two_tower's served graph
alone against it with each of those pre-ranking ``benchmark.models.cascade_candidates`` retrieved items
(quality over every test user; latency at concurrency 1 and 16). The best rows are trained again
with other seeds to show the spread.

Data and workflow are prepared once and copied into each run's own output folder, so
every run has its own complete, exportable artifacts.
"""

from __future__ import annotations

import copy
import time
from datetime import date
from pathlib import Path

import numpy as np

from twotower import pipeline
from twotower.benchmarks.harness import Column, derived_run, on_free_ports, output_folder, text_table, write_report
from twotower.config import RecipeConfig, config_to_dict
from twotower.models import RANKING_MODELS, SEQUENCE_MODELS
from twotower.models.multi_vector import multi_vector_top_k, overlap_at_k
from twotower.stages.evaluate import RECALL_KS, ranking_metrics, top_k_positions
from twotower.store.artifacts import load_split

# variant -> settings tried (the first is the variant's default); each a dict of overrides
VARIANTS: dict[str, list[dict]] = {
    "two_tower": [{"model.name": "two_tower"}],
    "two_tower+senet": [{"model.name": "two_tower", "model.gating": "senet"}],
    "two_tower+light_se": [{"model.name": "two_tower", "model.gating": "light_se"}],
    "dat": [
        {"model.name": "dat"},
        {"model.name": "dat", "model.dat.alignment_weight": 0.0},
        {"model.name": "dat", "model.dat.user_mimic_weight": 0.0, "model.dat.item_mimic_weight": 0.0},
    ],
    # the sequence towers trained over whole sequences (the default), then per row (model.sequence.training)
    **{name: [{"model.name": name}] for name in SEQUENCE_MODELS},
    "seq_attention/per_row": [
        {"model.name": "seq_attention", "model.sequence.training": "per_row"},
        {"model.name": "seq_attention", "model.sequence.training": "per_row", "model.sequence.dropout": 0.3},
    ],
    "seq_gru/per_row": [{"model.name": "seq_gru", "model.sequence.training": "per_row"}],
    "seq_hstu/per_row": [{"model.name": "seq_hstu", "model.sequence.training": "per_row"}],
    "inttower": [{"model.name": "inttower"}],
    "dcn_v2": [{"model.name": "dcn_v2"}],  # the ranking model: ranked exactly, served as a pre-ranker only
    "two_tower/bpr": [{"model.name": "two_tower", "model.loss": "bpr"}],
    "two_tower/bce": [{"model.name": "two_tower", "model.loss": "bce"}],
}
PRERANKERS = ("inttower", "dcn_v2")  # variants measured as the cascade's pre-ranking stage, when run
COLUMNS = [*(f"recall@{k}" for k in RECALL_KS), "ndcg@10", "mrr@100", "coverage@10"]


def _slug(name: str) -> str:
    return name.replace("/", "_").replace("+", "_")


def run_folder(base: RecipeConfig, shared: RecipeConfig, run_name: str, overrides: dict, seed: int) -> RecipeConfig:
    """A run folder holding a copy of the shared data and workflow, with ``overrides`` set."""
    config = derived_run(base, base.output_dir / "benchmark-models" / "runs" / run_name, {"seed": seed, **overrides})
    pipeline.copy_run_inputs(shared, config)
    return config


def _train(config: RecipeConfig) -> dict:
    from twotower.models.inttower import IntTowerRetrievalModel
    from twotower.stages.train import load_training_inputs, train_and_save

    started = time.perf_counter()
    inputs = load_training_inputs(config)
    model, metrics = train_and_save(config, verbose=2, inputs=inputs)
    history = metrics["history"]
    validation = f"val_{config.train.early_stopping_metric}"
    wall_seconds = time.perf_counter() - started
    multi_vector = (
        {"multi_vector": _multi_vector_retrieval(config, inputs, model)}
        if isinstance(model, IntTowerRetrievalModel)
        else {}
    )
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


def _multi_vector_retrieval(config: RecipeConfig, inputs, model) -> dict[str, float]:
    """An IntTower model's test split retrieved through FAISS over item heads
    (``twotower/models/multi_vector.py``, depth ``model.inttower.search_depth``): its Recall@10/100 and
    how much of the exact full-catalogue FE top 10/100 it finds (the row's own metrics are exact)."""
    from twotower.stages.train import held_out_eval_set

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


def _serve_run(config: RecipeConfig) -> None:
    """Index, feature store and export of this run."""
    pipeline.run_index(config)
    pipeline.run_features(config)
    pipeline.run_export(config)


def _latency(config: RecipeConfig, url: str, users: np.ndarray, concurrency: int) -> dict[str, float]:
    """Single-user requests at ``concurrency`` (after a warm-up) to the server at ``url``."""
    from twotower.benchmarks.serving import drive_requests, latency_summary, user_batches, warm_up

    requests, timeout = config.benchmark.models.serving_requests, config.serve.client_timeout_s
    warm_up(url, config, users, concurrency)
    latencies, errors, wall = drive_requests(
        url, config.serve.model_name, user_batches(users, requests, 1, config.seed + 1), concurrency, timeout
    )
    if errors:
        raise RuntimeError(f"{errors} of {requests} requests failed while measuring {config.output_dir.name}")
    return latency_summary(latencies, errors, wall, 1)


def _served(config: RecipeConfig):
    """A Triton server started here, on free ports, on this run's export."""
    from twotower.serving.triton import TritonServer

    return TritonServer(config.export_dir, config.output_dir / "triton", on_free_ports(config.serve))


def _test_users(config: RecipeConfig) -> np.ndarray:

    return load_split(config.splits_dir).test["user_id"].unique()


def _serving_latency(config: RecipeConfig) -> dict[str, float]:
    """Index, feature store and export of this run, then single-user requests at concurrency 1
    through a Triton server started here on free ports."""
    _serve_run(config)
    with _served(config) as server:
        summary = _latency(config, server.grpc_url, _test_users(config), 1)
    return {"serving_p50_ms": summary["p50_ms"], "serving_p99_ms": summary["p99_ms"]}


def _served_quality(config: RecipeConfig, url: str, test_set, catalogue_ids: np.ndarray) -> dict[str, float]:
    """Recall@k and NDCG@10 of what the server at ``url`` answers for every user of ``test_set``
    (requests of ``serve.max_request_users``), on the full-catalogue protocol: the same held-out
    positives and exclusions as the rows' in-process metrics."""
    from twotower.serving.client import recommend

    positions = {item: position for position, item in enumerate(catalogue_ids)}
    size, answers = config.serve.max_request_users, []
    for start in range(0, len(test_set.user_ids), size):
        answer = recommend(
            test_set.user_ids[start : start + size], url, config.serve.model_name, config.serve.client_timeout_s
        )
        answers.append(np.vectorize(positions.__getitem__)(answer["item_ids"]))
    metrics = ranking_metrics(np.concatenate(answers), test_set, ks=(config.serve.top_k,))
    return {name: metrics[name] for name in (f"recall@{config.serve.top_k}", "ndcg@10")}


def _cascade(retriever: RecipeConfig, rankers: list[RecipeConfig], candidates: int) -> dict[str, dict]:
    """The retriever's served graph (already exported) against it with each of ``rankers``' models
    as the pre-ranking stage over ``candidates`` retrieved items: quality through the server for
    every test user, and single-user latency at concurrency 1 and 16. The first pre-ranker's
    figures are ``with_prerank``, a further one's ``with_prerank_<model>``."""
    from twotower.stages.train import held_out_eval_set, load_training_inputs

    stages = [("retrieval_only", retriever)]
    for ranker in rankers:
        cascade = copy.deepcopy(retriever)
        cascade.serve.prerank_candidates, cascade.serve.prerank_run, cascade.serve.prerank_model = (
            candidates,
            ranker.output_dir,
            ranker.model.name,
        )
        cascade.export_dir = retriever.output_dir / f"triton_models_cascade_{ranker.model.name}"
        pipeline.run_export(cascade)
        stages.append(("with_prerank" if len(stages) == 1 else f"with_prerank_{ranker.model.name}", cascade))
    inputs = load_training_inputs(retriever)
    test_set, users = held_out_eval_set(inputs), _test_users(retriever)
    results = {}
    for name, config in stages:
        print(f"[benchmark-models] cascade: {name} through Triton", flush=True)
        with _served(config) as server:
            quality = _served_quality(config, server.grpc_url, test_set, inputs.catalogue.item_ids)
            latency = {f"c{c}": _latency(config, server.grpc_url, users, c) for c in (1, 16)}
        results[name] = {**quality, "p50_ms": latency["c1"]["p50_ms"], "latency": latency}
        if config.serve.prerank_candidates:
            results[name].update({"candidates": candidates, "prerank_model": config.serve.prerank_model})
    return results


def _table(rows: dict[str, dict]) -> str:
    columns = [
        Column("model", 22),
        *(Column(c, 12) for c in COLUMNS),
        Column("p50 ms", 9, ".2f"),
        Column("params", 11, ","),
        Column("s/epoch", 9, ".1f"),
        Column("epochs", 8, "d"),
    ]
    lines = []
    for name, row in rows.items():
        per_epoch = row.get("seconds_per_epoch")
        epochs = row["epochs_run"] if per_epoch is not None else None
        lines.append([name, *(row[c] for c in COLUMNS), row.get("serving_p50_ms"), row["params"], per_epoch, epochs])
    return text_table(columns, lines)


def _spread(runs: list[dict]) -> dict[str, dict[str, float]]:
    return {
        c: {"mean": float(np.mean([r[c] for r in runs])), "std": float(np.std([r[c] for r in runs]))}
        for c in ("recall@10", "recall@100", "ndcg@10")
    }


def run_model_benchmark(base: RecipeConfig) -> Path:
    from twotower.benchmarks.quality import baselines
    from twotower.views.plots import plot_model_tradeoff

    bench = base.benchmark
    out_dir = output_folder(base, "models")
    started = time.perf_counter()
    names = bench.models.variants or list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise ValueError(f"benchmark.models.variants: unknown {unknown}; known: {', '.join(VARIANTS)}")

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
            print(
                f"\n[benchmark-models] run {done}/{total_runs}: {name} setting {number} {overrides or '(defaults)'}",
                flush=True,
            )
            config = run_folder(base, shared, f"{_slug(name)}-{number}", overrides, base.seed)
            tried[name].append({"settings": overrides, "config": config, **_train(config)})
        best = max(tried[name], key=lambda run: run["validation"])
        print(
            f"[benchmark-models] {name}: chose {best['settings'] or '(defaults)'} on validation; serving it", flush=True
        )
        # a ranking model is not served as a retriever (models.check_retriever): no serving latency
        served = (
            {"serving_p50_ms": None, "serving_p99_ms": None}
            if best["config"].model.name in RANKING_MODELS
            else _serving_latency(best["config"])
        )
        rows[name] = {**{k: v for k, v in best.items() if k != "config"}, **served, "seeds": [base.seed]}

    seed_runs = {}
    for name in sorted(rows, key=lambda n: -rows[n]["validation"])[: bench.models.seed_rows]:
        settings = rows[name]["settings"]
        runs = [rows[name]]
        for seed in bench.models.extra_seeds:
            print(f"\n[benchmark-models] {name} again with seed {seed}", flush=True)
            runs.append({**_train(run_folder(base, shared, f"{_slug(name)}-seed{seed}", settings, seed)), "seed": seed})
        rows[name]["seeds"] = [base.seed, *bench.models.extra_seeds]
        seed_runs[name] = {"runs": [{c: r[c] for c in COLUMNS} for r in runs], "spread": _spread(runs)}

    cascade = None
    prerankers = [name for name in PRERANKERS if name in rows]
    if bench.models.cascade_candidates and "two_tower" in rows and prerankers:
        print(
            f"\n[benchmark-models] cascade: two_tower retrieving {bench.models.cascade_candidates}, "
            f"pre-ranked by {', '.join(prerankers)}",
            flush=True,
        )
        best = {
            name: max(tried[name], key=lambda run: run["validation"])["config"] for name in ("two_tower", *prerankers)
        }
        cascade = _cascade(best["two_tower"], [best[name] for name in prerankers], bench.models.cascade_candidates)

    reference = tried[names[0]][0]["config"]  # any run: they share data, split and catalogue
    for baseline, values in baselines(reference).items():
        # Not trained by gradient descent and not served: no epochs, no serving latency.
        rows[baseline] = {
            **values,
            "seeds": [],
            "serving_p50_ms": None,
            "serving_p99_ms": None,
            "seconds_per_epoch": None,
        }

    report = {
        "date": date.today().isoformat(),
        "dataset": base.data.dataset,
        "protocol": "per-user temporal holdout (latest 20% of positives), full catalogue, earlier positives excluded",
        "selection": f"each variant's setting with the best validation {base.train.early_stopping_metric}",
        "models": rows,
        "tried": {
            name: [{k: v for k, v in run.items() if k != "config"} for run in runs] for name, runs in tried.items()
        },
        "seed_repeats": seed_runs,
        **({"cascade": cascade} if cascade else {}),
        "base_config": config_to_dict(base),
        "total_seconds": time.perf_counter() - started,
    }
    json_path = write_report(report, out_dir / "models.json")
    plot_model_tradeoff(rows, out_dir / "tradeoff.png")
    print("\n" + _table(rows))
    for name, spread in seed_runs.items():
        print(
            f"{name} over seeds {rows[name]['seeds']}: "
            + ", ".join(f"{c} {v['mean']:.4f} ± {v['std']:.4f}" for c, v in spread["spread"].items())
        )
    for name, row in rows.items():
        if "multi_vector" in row:
            found = row["multi_vector"]
            print(
                f"{name} through FAISS over item heads (depth {found['search_depth']}): "
                + ", ".join(f"{key} {value:.4f}" for key, value in found.items() if key != "search_depth")
            )
    if cascade:
        print("cascade (served, every test user; p50 ms at concurrency 1 and 16):")
        for stage, values in cascade.items():
            latency = values["latency"]
            print(
                f"  {stage:<15}"
                + "".join(f" {key} {values[key]:.4f}" for key in values if key.startswith(("recall@", "ndcg@")))
                + f"  p50 {latency['c1']['p50_ms']:.2f} / {latency['c16']['p50_ms']:.2f}"
            )
    print(f"total {report['total_seconds'] / 60:.1f} min; plot {out_dir / 'tradeoff.png'}")
    print(json_path)
    return json_path

"""``make benchmark-quality``: popularity, EASE, the NVIDIA example's two-tower setup and
the recipe's tuned setup on one protocol, plus an ablation: each tuned option switched
off, and mixed negative sampling (off in the tuned setup) switched on.

Prints a table, saves plots (loss per epoch, Recall@K against K) and a JSON file whose
path is the last line printed.
"""

from __future__ import annotations

import time
from datetime import date
from pathlib import Path

import numpy as np

from twotower import pipeline
from twotower.benchmarks.harness import Column, derived_run, output_folder, text_table, write_report
from twotower.config import RecipeConfig, config_to_dict
from twotower.stages.baselines import ease_weights, evaluate_ease, evaluate_popularity, tune_ease
from twotower.stages.evaluate import RECALL_KS, build_eval_set
from twotower.store.artifacts import known_before_test, load_item_vectors, load_split
from twotower.views.plots import plot_quality

# The public NVIDIA example: MLP [128, 64], plain in-batch softmax, default embedding sizes, one epoch.
REFERENCE = {
    "train.tower_layers": [128, 64],
    "train.embedding_dim": None,
    "train.l2_normalize": False,
    "train.temperature": 1.0,
    "train.logq_correction": False,
    "train.history_length": 0,
    "train.epochs": 1,
}
# Each tuned option switched off on its own, and mixed negatives (not in the tuned setup) on.
ABLATIONS = {
    "tuned without logQ correction": {"train.logq_correction": False},
    "tuned without L2 norm + temperature": {"train.l2_normalize": False, "train.temperature": 1.0},
    "tuned without history feature": {"train.history_length": 0},
    "tuned with 1024 mixed negatives": {"train.mixed_negatives": 1024},
    "tuned with 4096 mixed negatives": {"train.mixed_negatives": 4096},
}


def _variant(base: RecipeConfig, name: str, overrides: dict) -> RecipeConfig:
    """A run of ``two_tower`` (the model the NVIDIA example trains and these options were tuned
    on, whatever ``model.name`` says) with ``overrides``."""
    folder = base.output_dir / "benchmark-quality" / name.replace(" ", "_").replace("+", "and")
    return derived_run(base, folder, {"model.name": "two_tower", **overrides})


def _train_variant(config: RecipeConfig) -> dict:
    started = time.perf_counter()
    pipeline.run_data(config)
    pipeline.run_workflow(config)
    metrics = pipeline.run_train(config)
    history = metrics["history"]
    return {
        **metrics["test"][config.model.name],
        "settings": config_to_dict(config)["train"],
        "epochs_run": len(history),
        "best_epoch": metrics["best_epoch"],
        "seconds_per_epoch": float(np.median([h["train_seconds"] for h in history])),
        "wall_seconds": time.perf_counter() - started,
        "history": history,
    }


def baselines(config: RecipeConfig) -> dict[str, dict]:
    """Popularity and EASE (regularisation tuned on validation) on ``config``'s split and catalogue."""

    split = load_split(config.splits_dir)
    catalogue, _ = load_item_vectors(config.item_vectors_path)
    known = known_before_test(split)
    test_set = build_eval_set(split.test, known, catalogue)
    started = time.perf_counter()
    regularisation, tried = tune_ease(split.train, build_eval_set(split.valid, split.train, catalogue), catalogue)
    # Refit on everything known before the test period, as the two-tower model's history is.
    ease = evaluate_ease(ease_weights(known, catalogue, regularisation), test_set)
    ease_seconds = time.perf_counter() - started
    return {
        "popularity": {**evaluate_popularity(split.train, test_set, catalogue), "settings": {}, "params": 0},
        "ease": {
            **ease,
            "settings": {"regularisation": regularisation, "validation_recall@100": tried},
            "wall_seconds": ease_seconds,
            "params": len(catalogue) ** 2,  # the item-item weight matrix
        },
    }


def _table(results: dict[str, dict], columns: list[str]) -> str:
    layout = [Column("configuration", 38), *(Column(c, 12) for c in columns), Column("s/epoch", 10, ".1f")]
    rows = [
        [name, *(values[c] for c in columns), values.get("seconds_per_epoch") or None]
        for name, values in results.items()
    ]
    return text_table(layout, rows)


def run_quality_benchmark(base: RecipeConfig, ablations: bool = True) -> Path:
    out_dir = output_folder(base, "quality")
    started = time.perf_counter()
    tuned_config = _variant(base, "tuned", {})
    trained = {
        "reference": _train_variant(_variant(base, "reference", REFERENCE)),
        "tuned": _train_variant(tuned_config),
    }
    configs = {**baselines(tuned_config), **trained}
    ablation = (
        {name: _train_variant(_variant(base, name, overrides)) for name, overrides in ABLATIONS.items()}
        if ablations
        else {}
    )

    columns = [f"recall@{k}" for k in RECALL_KS] + ["ndcg@10", "mrr@100", "coverage@10"]
    tuned = configs["tuned"]
    ratios = {
        f"tuned / {name} {metric}": tuned[metric] / configs[name][metric]
        for name in ("popularity", "ease", "reference")
        for metric in ("recall@10", "recall@100")
    }
    report = {
        "date": date.today().isoformat(),
        "dataset": base.data.dataset,
        "protocol": "per-user temporal holdout (latest 20% of positives), full catalogue, earlier positives excluded",
        "configs": configs,
        "ablations": {"tuned": tuned, **ablation},
        "ratios": ratios,
        "total_seconds": time.perf_counter() - started,
    }
    json_path = write_report(report, out_dir / "quality.json")
    plot_quality({**configs, **ablation}, RECALL_KS, out_dir)
    print("\n" + _table(configs, columns))
    if ablation:
        print("\nablation (each option switched, against tuned)\n" + _table({"tuned": tuned, **ablation}, columns))
    print("\n" + "\n".join(f"{name}: {value:.2f}x" for name, value in ratios.items()))
    print(f"total {report['total_seconds'] / 60:.1f} min; plots in {out_dir}")
    print(json_path)
    return json_path

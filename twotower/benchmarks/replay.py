"""``make benchmark-replay``: incremental retrains (``twotower retrain``) against full retrains, on replayed time.

The interactions are cut by time into the oldest ``benchmark.replay.start`` share and slices of
``benchmark.replay.slice`` each (shares of the interactions, oldest first, so each slice holds as
many interactions; ML-1M's are bunched in its first year). The first model is trained with every
stage on what is known at the first cutoff (``data.until``). Then the cutoff advances one slice
at a time, ``benchmark.replay.steps`` times, and at each step the run is retrained:

- **incremental**: ``twotower retrain --since <previous cutoff>`` with train.new_ids=oov (warm start
  from the chain's last model, ``train.retrain_epochs`` epochs on the slice's new training
  positives), once per ``benchmark.replay.ratios`` value of ``train.retrain_replay`` (older
  positives replayed per new one), each ratio its own chain;
- **full**: every stage from scratch on everything known at the cutoff (``twotower all``);
- **no retrain**: the first model as it is, with the history it knew (the cost of doing nothing).

Each is scored on the same held-out interactions: the positives of the slice after the cutoff,
full catalogue, every earlier positive excluded, as twotower/stages/evaluate.py scores (Recall@10,
Recall@100, NDCG@10). Users and items the model has not seen count as they are: a new user gets
the out-of-vocabulary id and their own features, a positive on an item outside the model's
catalogue is a miss. Query vectors come from the run's saved workflow and query tower, with the
history the run knew at its cutoff. Both retrains are timed end to end (wall seconds, export
included) and by their training epochs alone.

The runs' per-user holdouts are ``benchmark.replay.test_fraction`` and
``benchmark.replay.validation_fraction``: small, so that both kinds of retrain train on nearly
everything before the cutoff (validation still drives early stopping). Prints progress and a
table, saves ``replay.png`` and writes ``replay.json``, whose path is the last line printed.
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from twotower import pipeline
from twotower.benchmarks.harness import Column, derived_run, output_folder, text_table, write_report
from twotower.config import RecipeConfig
from twotower.lifecycle.retrain import retrain
from twotower.stages.data import load_dataset, positive_threshold, positives
from twotower.stages.evaluate import build_eval_set, evaluate_embeddings, query_vectors_of
from twotower.store.artifacts import load_item_vectors

FULL = "full retrain"
STALE = "no retrain"
METRICS = ("recall@10", "recall@100", "ndcg@10")


def incremental_arm(ratio: float) -> str:
    return f"incremental, replay {ratio:g}"


def slice_cutoffs(timestamps: pd.Series, start: float, width: float, steps: int) -> list[int]:
    """The cutoffs at the shares start, start + width, ... start + (steps + 1) * width of the
    interactions, oldest first (a share of 1 or more: just after the newest)."""
    ordered = np.sort(timestamps.to_numpy())
    cutoffs = []
    for share in start + width * np.arange(steps + 2):
        position = int(round(share * len(ordered)))
        cutoffs.append(int(ordered[position]) if position < len(ordered) else int(ordered[-1]) + 1)
    return cutoffs


def _arm_config(base: RecipeConfig, out_dir: Path, name: str) -> RecipeConfig:
    holdout = {
        "data.test_fraction": base.benchmark.replay.test_fraction,
        "data.validation_fraction": base.benchmark.replay.validation_fraction,
    }
    return derived_run(base, out_dir / name.replace(" ", "_").replace(",", ""), holdout)


def score(
    config: RecipeConfig, users: pd.DataFrame, every_positive: pd.DataFrame, known_until: int, cutoff: int, end: int
) -> dict:
    """Metrics of ``config``'s saved model on the positives in [cutoff, end), every earlier positive
    excluded, user history as the run knew it (positives before ``known_until``)."""

    timestamps = every_positive["timestamp"]
    held_out = every_positive[(timestamps >= cutoff) & (timestamps < end)]
    catalogue, item_vectors = load_item_vectors(config.item_vectors_path)
    eval_set = build_eval_set(held_out, every_positive[timestamps < cutoff], catalogue)
    evaluated = users[users["user_id"].isin(eval_set.user_ids)]
    query = query_vectors_of(config, evaluated, every_positive[timestamps < known_until], eval_set.user_ids)
    metrics = evaluate_embeddings(query, item_vectors, eval_set)
    return {
        **{name: metrics[name] for name in METRICS},
        "users": len(eval_set.user_ids),
        "catalogue_items": len(catalogue),
    }


def _training_seconds(config: RecipeConfig) -> float:
    """The training epochs' seconds of the run's last train stage (metrics.json's history)."""
    return float(sum(epoch["train_seconds"] for epoch in json.loads(config.metrics_path.read_text())["history"]))


def _timed(step) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def _day(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M")


def _table(rows: list[dict]) -> str:
    columns = [
        Column("step", 5, "d"),
        Column("cutoff (UTC)", 18),
        Column("retrain", 24),
        *(Column(m, 11) for m in METRICS),
        Column("wall s", 9, ".1f"),
        Column("train s", 9, ".1f"),
    ]
    lines = [
        [
            row["step"],
            _day(row["cutoff"]),
            row["arm"],
            *(row[m] for m in METRICS),
            row["wall_seconds"],
            row["train_seconds"],
        ]
        for row in rows
    ]
    return text_table(columns, lines)


def _summary(rows: list[dict], arms: list[str]) -> dict[str, dict]:
    """Per way of retraining, the mean over the steps after the first model."""
    later = [row for row in rows if row["step"] > 0]
    summary = {}
    for arm in arms:
        mine = [row for row in later if row["arm"] == arm]
        timed = [row["wall_seconds"] for row in mine if row["wall_seconds"] is not None]
        summary[arm] = {
            **{name: float(np.mean([row[name] for row in mine])) for name in METRICS},
            "wall_seconds": float(np.mean(timed)) if timed else None,
        }
    return summary


def run_replay_benchmark(base: RecipeConfig) -> Path:
    from twotower.views.plots import plot_replay

    bench = base.benchmark
    out_dir = output_folder(base, "replay")
    started = time.perf_counter()
    dataset = load_dataset(base.data, base.seed)
    every_positive = positives(dataset.interactions, positive_threshold(base.data))
    cutoffs = slice_cutoffs(
        dataset.interactions["timestamp"], bench.replay.start, bench.replay.slice, bench.replay.steps
    )
    incremental = [incremental_arm(ratio) for ratio in bench.replay.ratios]
    arms = [*incremental, FULL, STALE]
    configs = {arm: _arm_config(base, out_dir, arm) for arm in arms}
    for config in configs.values():
        shutil.rmtree(config.output_dir, ignore_errors=True)
    for arm, ratio in zip(incremental, bench.replay.ratios):
        configs[arm].train.new_ids = "oov"
        configs[arm].train.retrain_replay = ratio

    first = configs[FULL]
    first.data.until = cutoffs[0]
    print(
        f"[benchmark-replay] the first model: every stage on the interactions before {_day(cutoffs[0])} "
        f"({bench.replay.start:.0%}), in {first.output_dir}",
        flush=True,
    )
    first_seconds = _timed(lambda: pipeline.run_all(first))
    for arm in [*incremental, STALE]:
        shutil.copytree(first.output_dir, configs[arm].output_dir)
        configs[arm].data.until = cutoffs[0]

    def row(step: int, arm: str, wall_seconds: float | None, new_positives: int, **extra) -> dict:
        config = configs[arm]
        metrics = score(config, dataset.users, every_positive, config.data.until, cutoffs[step], cutoffs[step + 1])
        trained = wall_seconds is not None
        print(
            f"[benchmark-replay] step {step}, {arm}: recall@10 {metrics['recall@10']:.4f}, "
            f"recall@100 {metrics['recall@100']:.4f}" + (f", {wall_seconds:.1f} s" if trained else ""),
            flush=True,
        )
        return {
            "step": step,
            "cutoff": cutoffs[step],
            "arm": arm,
            "new_positives": new_positives,
            **metrics,
            "wall_seconds": wall_seconds,
            "train_seconds": _training_seconds(config) if trained else None,
            **extra,
        }

    rows = [row(0, arm, first_seconds if arm == FULL else None, 0) for arm in arms]
    for step in range(1, bench.replay.steps + 1):
        since, until = cutoffs[step - 1], cutoffs[step]
        new_positives = int(((every_positive["timestamp"] >= since) & (every_positive["timestamp"] < until)).sum())
        print(f"[benchmark-replay] step {step}: cutoff {_day(until)}, {new_positives:,} new positives", flush=True)
        for arm in incremental:
            configs[arm].data.until = until
            reports = []
            wall = _timed(lambda reports=reports, arm=arm, since=since: reports.append(retrain(configs[arm], since)))
            rows.append(
                row(
                    step,
                    arm,
                    wall,
                    new_positives,
                    trained_positives=reports[0].trained_positives,
                    replayed=reports[0].replayed,
                )
            )
        configs[FULL].data.until = until
        rows.append(row(step, FULL, _timed(lambda: pipeline.run_all(configs[FULL])), new_positives))
        rows.append(row(step, STALE, None, new_positives))

    summary = _summary(rows, arms)
    report = {
        "date": date.today().isoformat(),
        "dataset": base.data.dataset,
        "protocol": "global time cutoffs at shares of the interactions; "
        "each retrain scored on the next slice's positives, "
        "full catalogue, earlier positives excluded, unseen users and items counted as they are",
        "cutoffs": cutoffs,
        "settings": {
            "replay_start": bench.replay.start,
            "replay_slice": bench.replay.slice,
            "replay_ratios": bench.replay.ratios,
            "retrain_epochs": base.train.retrain_epochs,
            "epochs": base.train.epochs,
            "test_fraction": bench.replay.test_fraction,
            "validation_fraction": bench.replay.validation_fraction,
        },
        "rows": rows,
        "summary": summary,
        "total_seconds": time.perf_counter() - started,
    }
    json_path = write_report(report, out_dir / "replay.json")
    plot_replay(rows, out_dir / "replay.png")
    print("\n" + _table(rows))
    print("\nmean over the steps after the first model:")
    for arm, values in summary.items():
        seconds = f", {values['wall_seconds']:.1f} s per retrain" if values["wall_seconds"] is not None else ""
        print(f"  {arm:<22} " + ", ".join(f"{name} {values[name]:.4f}" for name in METRICS) + seconds)
    print(f"total {report['total_seconds'] / 60:.1f} min; plot {out_dir / 'replay.png'}")
    print(json_path)
    return json_path

"""``make benchmark-cold-start``: what refresh-items' cold start costs, against training.

Two runs of the recipe on the same data:

- **trained normally**: every stage as ``make export`` runs it;
- **cold start**: the newest items, the ``benchmark.cold_start.share`` of the trained run's
  catalogue whose first interaction (any rating) is latest, lose every training and validation
  positive, so the workflow, the model, the index and Feast never see them. They are then added
  with refresh-items, from their features alone (twotower/lifecycle/refresh.py: the item tower sees the
  shared out-of-vocabulary id embedding plus their year and genres).

Both are measured on the test split through the served path (saved query tower, FAISS index,
earlier positives excluded, whole catalogue): Recall@K over the held-out items' test positives
(for the users who have one), and over all test positives. Prints a table and writes a JSON
file whose path is the last line printed.
"""

from __future__ import annotations

import time
from datetime import date
from pathlib import Path

import numpy as np

from twotower import pipeline
from twotower.benchmarks.harness import Column, derived_run, output_folder, text_table, write_report
from twotower.config import RecipeConfig
from twotower.lifecycle.refresh import refresh_items
from twotower.stages.evaluate import RECALL_KS, serving_side_metrics
from twotower.store.artifacts import SPLITS, load_item_vectors, load_recipe_data, load_split
from twotower.store.atomic import atomic_dir
from twotower.store.manifest import recorded_stage

RUNS = {"trained": "trained normally", "cold_start": "cold start (refresh-items)"}


def newest_items(config: RecipeConfig, share: float) -> np.ndarray:
    """The ``share`` of ``config``'s catalogue (at least one item) whose first interaction is
    latest, newest first (ties by id)."""

    catalogue, _ = load_item_vectors(config.item_vectors_path)
    interactions = load_recipe_data(config.data_dir).interactions
    first = interactions[interactions["item_id"].isin(catalogue)].groupby("item_id", as_index=False)["timestamp"].min()
    newest = first.sort_values(["timestamp", "item_id"], ascending=[False, True])["item_id"]
    return newest.head(max(1, round(share * len(catalogue)))).to_numpy()


def hold_out_items(config: RecipeConfig, items: np.ndarray) -> None:
    """Drop every training and validation positive of ``items`` from the run's split (their test
    positives stay), re-recording the data stage: to the stages after it they are items nobody
    has interacted with yet."""
    split = load_split(config.splits_dir)
    with recorded_stage(config, "data"), atomic_dir(config.splits_dir) as splits_dir:
        for name in SPLITS:
            rows = getattr(split, name)
            kept = rows if name == "test" else rows[~rows["item_id"].isin(items)]
            kept.to_parquet(splits_dir / f"{name}.parquet", index=False)


def _measure(config: RecipeConfig, held_out: np.ndarray) -> dict:

    return {
        "held_out_items": serving_side_metrics(config, held_out),
        "all_items": serving_side_metrics(config),
        "catalogue_items": len(load_item_vectors(config.item_vectors_path)[0]),
    }


def _table(rows: dict[str, dict]) -> str:
    recalls = [f"recall@{k}" for k in RECALL_KS]
    columns = [
        Column("", 30),
        *(Column(f"new R@{k}", 11) for k in RECALL_KS),
        Column("all R@10", 11),
        Column("all R@100", 11),
    ]
    lines = [
        [
            RUNS[name],
            *(row["held_out_items"][r] for r in recalls),
            row["all_items"]["recall@10"],
            row["all_items"]["recall@100"],
        ]
        for name, row in rows.items()
    ]
    trained, cold = rows["trained"]["held_out_items"], rows["cold_start"]["held_out_items"]
    lines.append(["cold start / trained", *(f"{cold[r] / trained[r]:.2f}x" if trained[r] else None for r in recalls)])
    return text_table(columns, lines)


def run_cold_start_benchmark(base: RecipeConfig) -> Path:

    out_dir = output_folder(base, "cold-start")
    started = time.perf_counter()
    trained, cold = derived_run(base, out_dir / "trained"), derived_run(base, out_dir / "cold_start")

    print(f"[benchmark-cold-start] trained normally, in {trained.output_dir}", flush=True)
    for stage in (pipeline.run_data, pipeline.run_workflow, pipeline.run_train, pipeline.run_index):
        stage(trained)
    held_out = newest_items(trained, base.benchmark.cold_start.share)

    print(
        f"[benchmark-cold-start] the {len(held_out):,} newest items held out from training, in {cold.output_dir}",
        flush=True,
    )
    pipeline.run_data(cold)
    hold_out_items(cold, held_out)
    for stage in (
        pipeline.run_workflow,
        pipeline.run_train,
        pipeline.run_index,
        pipeline.run_features,
        pipeline.run_export,
    ):
        stage(cold)
    items = load_recipe_data(cold.data_dir).items
    new_items = out_dir / "held_out_items.parquet"
    items[items["item_id"].isin(held_out)].to_parquet(new_items, index=False)
    refresh_items(cold, new_items)

    rows = {"trained": _measure(trained, held_out), "cold_start": _measure(cold, held_out)}
    test = load_split(trained.splits_dir).test
    held_out_test = test[test["item_id"].isin(held_out)]
    report = {
        "date": date.today().isoformat(),
        "dataset": base.data.dataset,
        "protocol": "per-user temporal holdout, full catalogue, earlier positives excluded, "
        "served path (query tower + FAISS)",
        "held_out": {
            "share": base.benchmark.cold_start.share,
            "items": held_out.tolist(),
            "test_positives": len(held_out_test),
            "test_users": int(held_out_test["user_id"].nunique()),
        },
        "runs": {RUNS[name]: row for name, row in rows.items()},
        "total_seconds": time.perf_counter() - started,
    }
    json_path = write_report(report, out_dir / "cold_start.json")
    print(
        f"\nheld out: the {len(held_out):,} items ({base.benchmark.cold_start.share:.0%} of the catalogue) "
        "whose first interaction "
        f"is latest; {len(held_out_test):,} test positives of {report['held_out']['test_users']:,} users"
    )
    print(_table(rows))
    print(f"total {report['total_seconds'] / 60:.1f} min")
    print(json_path)
    return json_path

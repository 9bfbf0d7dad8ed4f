"""``make benchmark-sequential``: the family's sequence towers on the public next-item protocol of
generative-recommenders' MovieLens-1M table, the published rows printed beside ours.

Protocol (generative-recommenders' ``research/data`` code): every rating is an interaction,
each user's items ordered by time (ties kept in file order), the last item is the test target
and the second-to-last the validation target; a user is ranked against every item rated by
anyone (3,706 movies), with the user's earlier items filtered out; HR@K is the share of users
whose target is in the top K, NDCG@K the mean of 1 / log2(rank + 1) over them.

Each model is trained next-item (``twotower.models.next_item``) on every user's items before the
validation target, evaluated on validation every few epochs, stopped when validation NDCG@10
stops improving, and scored once on the test target with the best validation weights (its
history then includes the validation item, which it never trained on as a target).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from twotower.benchmarks.harness import Column, output_folder, text_table, write_report
from twotower.config import ConfigError, RecipeConfig, SequenceConfig, SequentialBenchmarkConfig
from twotower.models import SEQUENCE_MODELS
from twotower.models.next_item import CausalMeanPool, NextItemModel, NextItemTrainer
from twotower.models.sequence import history_encoder
from twotower.stages.data import load_dataset
from twotower.stages.train import set_seeds
from twotower.views.plots import plot_sequential

KS = (10, 50, 200)
METRICS = [f"{metric}@{k}" for k in KS for metric in ("hr", "ndcg")]
ROWS = ("popularity", "two_tower", *SEQUENCE_MODELS)
# generative-recommenders' README, MovieLens-1M (read 2026-12-06)
PUBLISHED = {
    "SASRec (published)": dict(zip(METRICS, (0.2853, 0.1603, 0.5474, 0.2185, 0.7528, 0.2498))),
    "HSTU (published)": dict(zip(METRICS, (0.3097, 0.1720, 0.5754, 0.2307, 0.7716, 0.2606))),
    "HSTU-large (published)": dict(zip(METRICS, (0.3294, 0.1893, 0.5935, 0.2481, 0.7839, 0.2771))),
}
EVAL_BATCH = 256


@dataclass
class Sequences:
    """Every user's items (codes 1..items, 0 is padding) and timestamps, oldest first."""

    items: list[np.ndarray]
    times: list[np.ndarray]
    catalogue: int  # items rated by anyone

    def cut(self, held_out: int) -> Sequences:
        """Each sequence without its last ``held_out`` items."""
        end = [len(items) - held_out for items in self.items]
        return Sequences(
            [items[:n] for items, n in zip(self.items, end)], [t[:n] for t, n in zip(self.times, end)], self.catalogue
        )


def user_sequences(interactions: pd.DataFrame) -> Sequences:
    """Users with at least three interactions (train, validation and test need one each)."""
    codes, _ = pd.factorize(interactions["item_id"], sort=True)
    frame = interactions.assign(code=codes + 1).sort_values(["user_id", "timestamp"], kind="stable")
    frame = frame[frame.groupby("user_id")["code"].transform("size") >= 3]
    groups = frame.groupby("user_id", sort=True)
    items = [values.to_numpy(np.int32) for _, values in groups["code"]]
    times = [values.to_numpy(np.int64) for _, values in groups["timestamp"]]
    return Sequences(items, times, int(codes.max()) + 1)


def padded(rows: list[np.ndarray], length: int, dtype) -> np.ndarray:
    """The latest ``length`` values of each row, left-aligned, zeros after the end."""
    out = np.zeros((len(rows), max(1, min(length, max(len(r) for r in rows)))), dtype)
    for position, row in enumerate(rows):
        latest = row[-length:]
        out[position, : len(latest)] = latest
    return out


def length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Rows grouped into batches of similar length (each padded only to its own longest), in a
    random order when ``rng`` is given."""
    order = np.arange(len(lengths)) if rng is None else rng.permutation(len(lengths))
    order = order[np.argsort(lengths[order], kind="stable")]
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    return batches if rng is None else [batches[i] for i in rng.permutation(len(batches))]


def training_batches(
    sequences: Sequences, max_length: int, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Padded (items, timestamps) of the latest ``max_length`` + 1 items per user: ``max_length``
    inputs and their next items."""
    lengths = np.array([min(len(items), max_length + 1) for items in sequences.items])
    for rows in length_batches(lengths, batch_size, rng):
        yield (
            padded([sequences.items[r] for r in rows], max_length + 1, np.int32),
            padded([sequences.times[r] for r in rows], max_length + 1, np.int64),
        )


def ranks(scores: np.ndarray, seen: list[np.ndarray], targets: np.ndarray) -> np.ndarray:
    """0-based rank of each row's target among its unseen items ([rows, items] scores by code - 1)."""
    scores = scores.astype(np.float64, copy=True)
    target_scores = scores[np.arange(len(targets)), targets - 1]
    for row, items in enumerate(seen):
        scores[row, items - 1] = -np.inf
    return (scores > target_scores[:, None]).sum(axis=1)


def ranking_metrics(target_ranks: np.ndarray) -> dict[str, float]:
    metrics = {}
    for k in KS:
        hit = target_ranks < k
        metrics[f"hr@{k}"] = float(hit.mean())
        metrics[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(target_ranks + 2.0), 0.0).mean())
    return metrics


def evaluate(
    score_rows: Callable[[list[int], Sequences], np.ndarray], sequences: Sequences, held_out: int
) -> dict[str, float]:
    """Metrics of the target ``held_out`` items from each user's end (2: validation, 1: test),
    ranked by ``score_rows(users, histories)`` -> [users, items] given everything before it."""
    histories = sequences.cut(held_out)
    targets = np.array([items[len(items) - held_out] for items in sequences.items])
    lengths = np.array([len(items) for items in histories.items])
    target_ranks = np.empty(len(targets), np.int64)
    for rows in length_batches(lengths, EVAL_BATCH, None):
        scores = score_rows(list(rows), histories)
        target_ranks[rows] = ranks(scores, [histories.items[r] for r in rows], targets[rows])
    return ranking_metrics(target_ranks)


def popularity_scores(train: Sequences) -> Callable[[list[int], Sequences], np.ndarray]:
    counts = np.bincount(np.concatenate(train.items), minlength=train.catalogue + 1)[1:].astype(np.float64)
    return lambda rows, histories: np.broadcast_to(counts, (len(rows), len(counts)))


def model_scores(model: NextItemModel, max_length: int) -> Callable[[list[int], Sequences], np.ndarray]:
    """Scores from the query at each history's latest position."""

    def score_rows(rows: list[int], histories: Sequences) -> np.ndarray:
        items = padded([histories.items[r] for r in rows], max_length, np.int32)
        times = padded([histories.times[r] for r in rows], max_length, np.int64)
        queries = model(tf.constant(items), tf.constant(times), training=False)
        lengths = np.minimum([len(histories.items[r]) for r in rows], max_length)
        latest = tf.gather(queries, tf.constant(lengths - 1), batch_dims=1)
        return (latest @ tf.transpose(model.item_vectors())).numpy()

    return score_rows


def build_row_model(name: str, settings: SequentialBenchmarkConfig, catalogue: int) -> NextItemModel:
    dim = settings.embedding_dim
    if name == "two_tower":  # the mean-pooled history through two_tower's MLP
        mlp = tf.keras.Sequential([tf.keras.layers.Dense(dim, activation="relu"), tf.keras.layers.Dense(dim)])
        return NextItemModel(catalogue, dim, CausalMeanPool(), head=mlp, dropout=settings.dropout)
    sequence = SequenceConfig(heads=settings.heads, blocks=settings.blocks, dropout=settings.dropout)
    return NextItemModel(
        catalogue,
        dim,
        history_encoder(name, settings.max_length, sequence, whole_sequence=True),
        dropout=settings.dropout,
    )


def train_row(name: str, sequences: Sequences, settings: SequentialBenchmarkConfig, seed: int) -> dict:
    """Train ``name`` next-item with early stopping on validation; test metrics of its best epoch."""
    set_seeds(seed)
    rng = np.random.default_rng(seed)
    train = sequences.cut(2)
    model = build_row_model(name, settings, sequences.catalogue)
    targets = np.concatenate([items[1:] for items in train.items])
    trainer = NextItemTrainer.for_model(
        model,
        np.bincount(targets, minlength=sequences.catalogue + 1),
        loss=settings.loss,
        uniform_negatives=settings.uniform_negatives,
        in_batch_negatives=settings.in_batch_negatives,
        temperature=settings.temperature,
        learning_rate=settings.learning_rate,
    )
    curve, epoch_seconds, trained_seconds = [], [], 0.0
    best = {"ndcg@10": -1.0}
    best_weights, best_epoch, stale = None, 0, 0
    for epoch in range(1, settings.max_epochs + 1):
        started = time.perf_counter()
        losses = [
            float(trainer.step((tf.constant(items), tf.constant(times))))
            for items, times in training_batches(train, settings.max_length, settings.batch_size, rng)
        ]
        epoch_seconds.append(time.perf_counter() - started)
        trained_seconds += epoch_seconds[-1]
        if epoch % settings.eval_every and epoch != settings.max_epochs:
            continue
        validation = evaluate(model_scores(model, settings.max_length), sequences, held_out=2)
        curve.append({"epoch": epoch, "train_seconds": trained_seconds, "loss": float(np.mean(losses)), **validation})
        print(
            f"[sequential] {name} epoch {epoch}: loss {curve[-1]['loss']:.4f}, validation HR@10 "
            f"{validation['hr@10']:.4f} NDCG@10 {validation['ndcg@10']:.4f} ({trained_seconds:.0f} s)",
            flush=True,
        )
        if validation["ndcg@10"] > best["ndcg@10"]:
            best, best_weights, best_epoch, stale = validation, model.get_weights(), epoch, 0
        else:
            stale += 1
            if stale >= settings.patience:
                break
    model.set_weights(best_weights)
    return {
        **evaluate(model_scores(model, settings.max_length), sequences, held_out=1),
        "validation": best,
        "best_epoch": best_epoch,
        "epochs": len(epoch_seconds),
        "seconds_per_epoch": float(np.median(epoch_seconds)),
        "params": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
        "curve": curve,
    }


def popularity_row(sequences: Sequences) -> dict:
    validation = evaluate(popularity_scores(sequences.cut(2)), sequences, held_out=2)
    test = evaluate(popularity_scores(sequences.cut(1)), sequences, held_out=1)
    return {**test, "validation": validation, "epochs": 0, "seconds_per_epoch": 0.0, "params": 0}


def run_sequential_benchmark(config: RecipeConfig) -> Path:
    settings = config.benchmark.sequential
    unknown = sorted(set(settings.models) - set(ROWS))
    if unknown:
        raise ConfigError(f"benchmark.sequential.models: unknown {unknown}; known: {', '.join(ROWS)}")
    out_dir = output_folder(config, "sequential")
    started = time.perf_counter()
    sequences = user_sequences(load_dataset(config.data, config.seed).interactions)
    print(
        f"[sequential] {config.data.dataset}: {len(sequences.items)} users, {sequences.catalogue} items, "
        f"{sum(len(items) for items in sequences.items)} interactions",
        flush=True,
    )
    rows: dict[str, dict] = {}
    report = {
        "date": date.today().isoformat(),
        "dataset": config.data.dataset,
        "users": len(sequences.items),
        "items": sequences.catalogue,
        "protocol": "leave-last-out next item, every rating, whole catalogue, earlier items excluded",
        "settings": asdict(settings),
        "rows": rows,
        "published": PUBLISHED,
    }
    json_path = out_dir / "sequential.json"
    for name in settings.models or ROWS:
        rows[name] = (
            popularity_row(sequences) if name == "popularity" else train_row(name, sequences, settings, config.seed)
        )
        # Rewritten after each row: a long run that is stopped keeps the rows it finished.
        write_report({**report, "total_seconds": time.perf_counter() - started}, json_path)
    report["total_seconds"] = time.perf_counter() - started
    write_report(report, json_path)
    plot_sequential(report, out_dir / "hr10_against_training_time.png")
    layout = [Column("model (test target)", 26), *(Column(m, 10) for m in METRICS), Column("s/epoch", 9, ".1f")]
    table_rows = [[name, *(row[m] for m in METRICS), row["seconds_per_epoch"] or None] for name, row in rows.items()]
    table_rows += [[name, *(row[m] for m in METRICS), None] for name, row in PUBLISHED.items()]
    print("\n" + text_table(layout, table_rows))
    print(f"total {report['total_seconds'] / 60:.1f} min; plot in {out_dir}")
    print(json_path)
    return json_path

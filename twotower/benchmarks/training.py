"""``make benchmark-train``: the recipe's training throughput against plain tf.keras, where a
step's time goes, and how an epoch grows with the data.

On the encoded training positives (ML-1M by default), in one process and one run:

- **recipe**: the recipe's own path (``train.load_training_inputs``, ``build_model``,
  ``training_batches``) as configured, by default with the cached loader;
- **recipe with mm.Loader**: the same with ``train.loader=merlin``, merlin-models' own loader,
  which the recipe used before (the "before" of the loader change);
- **plain tf.keras**: ``plain_keras.PlainTwoTower``, the same architecture, loss, optimizer and
  batch size without Merlin, fed the same rows from NumPy arrays through the same tf.data
  batching (``train.shuffled_batches``).

Each trains ``benchmark.train.epochs`` epochs; the first traces the train step and is left
out, the median of the others gives examples per second. The profile times each loader
alone for one epoch, each train step on one resident batch (no loader at all), and sums a
tf.profiler trace of a few steps per op and per part of the recipe's model. Then one epoch of
the recipe at each of ``benchmark.train.scale_factors`` times the users: the encoded training
rows replicated in memory, each copy's users under new user ids (not re-encoded by NVTabular).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from datetime import date
from pathlib import Path

import merlin.io
import numpy as np
import pandas as pd
import tensorflow as tf
from merlin.schema import Schema, Tags

from twotower import pipeline
from twotower.benchmarks.harness import Column, output_folder, text_table, write_report
from twotower.benchmarks.support.plain_keras import Layout, PlainTwoTower, build_plain_model, padded_arrays
from twotower.config import RecipeConfig, config_to_dict
from twotower.models.base import RetrievalModel, share_item_table, table_name, with_domain
from twotower.stages.train import (
    TrainingInputs,
    build_model,
    cached_batches,
    load_training_inputs,
    set_seeds,
    shuffled_batches,
    training_batches,
)

SIDES = ("recipe", "recipe_merlin_loader", "plain_keras")
# Parts of the recipe's train step, told apart by the name scopes merlin-models gives its
# layers' ops (backward ops carry the same names under gradient_tape/); first match wins.
RECIPE_PARTS = (
    ("softmax cross-entropy", ("softmax_loss",)),
    ("logQ correction", ("popularity_logits_correction",)),
    ("in-batch scores, accidental hits, temperature", ("contrastive_output", "logits_temperature_scaler")),
    ("towers: embeddings, MLPs, L2 norm", ("parallel_block", "encoder")),
)
OTHER_PART = "optimizer (Adam) and gradient sums"


def check_comparable(config: RecipeConfig) -> None:
    """The plain model implements two_tower with its default loss only (see plain_keras)."""
    train, model = config.train, config.model
    differences = {
        "model.gating": model.gating != "none",
        "model.loss": model.loss != "softmax",
        "train.logq_correction": not train.logq_correction,
        "train.l2_normalize": not train.l2_normalize,
        "train.mixed_negatives": train.mixed_negatives != 0,
        "train.embedding_dim": train.embedding_dim is None,
    }
    changed = [key for key, differs in differences.items() if differs]
    if changed:
        raise ValueError(
            "benchmark-train compares two_tower with its default loss; these settings differ from it: "
            + ", ".join(changed)
        )


def plain_layout(schema: Schema) -> Layout:
    """The recipe's tables and towers, read from its training schema."""
    schema = share_item_table(schema)
    return Layout(
        table_rows={table_name(c): c.int_domain.max + 1 for c in schema},
        tables={c.name: table_name(c) for c in schema},
        query_columns=tuple(schema.select_by_tag(Tags.USER).column_names),
        item_columns=tuple(schema.select_by_tag(Tags.ITEM).column_names),
        item_id=schema.select_by_tag(Tags.ITEM_ID).first.name,
    )


def item_log_q(item_counts: np.ndarray) -> np.ndarray:
    """Log of each item's share of the training positives: the in-batch sampling probability
    that ``losses.contrastive_output`` corrects for."""
    return np.log(item_counts / item_counts.sum())


def recipe_side(config: RecipeConfig, inputs: TrainingInputs, loader: str) -> tuple[RetrievalModel, tf.data.Dataset]:
    """The recipe's model and batches, as ``train.fit_model`` makes them, with ``loader``."""
    side = copy.deepcopy(config)
    side.train.loader = loader
    set_seeds(config.seed)
    return build_model(side, inputs), training_batches(side, inputs.train_dataset)


def plain_side(config: RecipeConfig, inputs: TrainingInputs) -> tuple[PlainTwoTower, tf.data.Dataset]:
    """The plain model and the same encoded rows, padded, batched by the recipe's tf.data path."""
    layout = plain_layout(inputs.schema)
    arrays = padded_arrays(inputs.train_dataset.to_ddf().compute(), [*layout.query_columns, *layout.item_columns])
    set_seeds(config.seed)
    model = build_plain_model(layout, config.train, item_log_q(inputs.item_counts))
    tensors = {name: tf.constant(values) for name, values in arrays.items()}
    return model, shuffled_batches(tensors, config.train.batch_size, config.seed)


class EpochClock(tf.keras.callbacks.Callback):
    """Wall seconds of every epoch and step (one batch end to the next), printed per epoch."""

    def __init__(self, label: str, rows: int):
        super().__init__()
        self.label, self.rows = label, rows
        self.epoch_seconds: list[float] = []
        self.step_seconds: list[list[float]] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start = self._last_step = time.perf_counter()
        self.step_seconds.append([])

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        now = time.perf_counter()
        self.step_seconds[-1].append(now - self._last_step)
        self._last_step = now

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        seconds = time.perf_counter() - self._epoch_start
        self.epoch_seconds.append(seconds)
        print(
            f"[benchmark-train] {self.label}: epoch {epoch + 1}/{self.params['epochs']} {seconds:.1f} s, "
            f"{self.rows / seconds:,.0f} examples/s",
            flush=True,
        )


def timed_fit(
    keras_model: tf.keras.Model,
    batches: Iterable,
    epochs: int,
    rows: int,
    batch_size: int,
    label: str,
    warmup_epochs: int,
) -> dict:
    """Fit ``epochs`` epochs; the median of those after ``warmup_epochs`` is the throughput."""
    clock = EpochClock(label, rows)
    keras_model.fit(batches, epochs=epochs, callbacks=[clock], verbose=0)
    counted = clock.epoch_seconds[warmup_epochs:]
    epoch_s = float(np.median(counted))
    return {
        "examples_per_s": rows / epoch_s,
        "epoch_s": epoch_s,
        "step_ms": 1000 * epoch_s / -(-rows // batch_size),  # an epoch over its steps
        "median_step_ms": 1000 * float(np.median(np.concatenate(clock.step_seconds[warmup_epochs:]))),
        "epochs_s": counted,
        "warmup_epochs_s": clock.epoch_seconds[:warmup_epochs],
    }


def loader_seconds(batches: Iterable) -> float:
    """One epoch of batches drawn and thrown away: the loader's cost with no training."""
    started = time.perf_counter()
    for _ in batches:
        pass
    return time.perf_counter() - started


def resident_batch(batches: tf.data.Dataset) -> dict[str, tf.Tensor]:
    """One batch held in memory, to time the train step without any loader."""
    return next(iter(batches))


def repeated_batch(batch: dict[str, tf.Tensor], steps: int) -> tf.data.Dataset:
    """``batch`` ``steps`` times, its row count left unknown as in a loader's batches (merlin-models'
    input block refuses a static row count that its list columns do not have)."""

    def unknown_rows(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {
            name: tf.compat.v1.placeholder_with_default(values, [None, *values.shape[1:]])
            for name, values in features.items()
        }

    return tf.data.Dataset.from_tensors(batch).repeat(steps).map(unknown_rows)


def resident_step_ms(keras_model: tf.keras.Model, batch: dict[str, tf.Tensor], steps: int, label: str) -> float:
    """Median milliseconds of a train step on ``batch`` over and over (the first steps trace)."""
    clock = EpochClock(f"{label}, one resident batch", len(next(iter(batch.values()))) * steps)
    keras_model.fit(repeated_batch(batch, steps), callbacks=[clock], verbose=0)
    return 1000 * float(np.median(clock.step_seconds[0][2:]))


def traced_op_ms(keras_model: tf.keras.Model, batch: dict[str, tf.Tensor], steps: int) -> Counter:
    """Milliseconds per step of each TensorFlow op (``name:type``) from a tf.profiler trace of
    ``steps`` train steps on ``batch``, summed over the executor's threads (ops of one step run
    side by side, so the sum exceeds the wall time)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    repeated = repeated_batch(batch, steps)
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        keras_model.fit(repeated, verbose=0)
        tf.profiler.experimental.stop()
        (trace,) = Path(logdir).rglob("*.xplane.pb")
        space = xplane_pb2.XSpace.FromString(trace.read_bytes())
    op_ms = Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):  # the threads that run ops
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" in name and "::" not in name:  # an op, not the executor's own bookkeeping
                    op_ms[name] += event.duration_ps / 1e9 / steps
    return op_ms


def top_op_types(op_ms: Counter, count: int = 8) -> list[dict]:
    by_type = Counter()
    for name, ms in op_ms.items():
        by_type[name.rpartition(":")[2]] += ms
    total = sum(by_type.values())
    return [{"op": kind, "ms_per_step": ms, "share": ms / total} for kind, ms in by_type.most_common(count)]


def recipe_parts(op_ms: Counter) -> dict[str, dict[str, float]]:
    """Op time per step by part of the recipe's model, forward and backward."""
    parts = {name: {"forward_ms": 0.0, "backward_ms": 0.0} for name, _ in RECIPE_PARTS} | {
        OTHER_PART: {"forward_ms": 0.0, "backward_ms": 0.0}
    }
    for name, ms in op_ms.items():
        part = next((part for part, scopes in RECIPE_PARTS if any(scope in name for scope in scopes)), OTHER_PART)
        parts[part]["backward_ms" if name.startswith("gradient_tape/") else "forward_ms"] += ms
    total = sum(op_ms.values())
    return {
        part: {**times, "share": (times["forward_ms"] + times["backward_ms"]) / total} for part, times in parts.items()
    }


def replicated_users(inputs: TrainingInputs, copies: int) -> TrainingInputs:
    """The training rows ``copies`` times over, each copy's users under new user ids (codes
    shifted past the previous copy's, the user table grown to match): a user base ``copies``
    times larger with the same items and behaviour, built in memory from the encoded rows."""
    user_id = inputs.schema.select_by_tag(Tags.USER_ID).first
    users = user_id.int_domain.max + 1
    frame = inputs.train_dataset.to_ddf().compute()
    rows = pd.concat(
        [frame.assign(**{user_id.name: frame[user_id.name] + copy * users}) for copy in range(copies)],
        ignore_index=True,
    )
    schema = with_domain(inputs.schema, user_id.name, {**user_id.properties["domain"], "max": copies * users - 1})
    return dataclasses.replace(
        inputs, train_dataset=merlin.io.Dataset(rows, schema=schema), item_counts=inputs.item_counts * copies
    )


def scale_epochs(config: RecipeConfig, inputs: TrainingInputs, rows: int) -> dict[str, dict]:
    """One epoch of the recipe per user-base size, after two steps that trace the train step.
    Always with the cached loader: mm.Loader's epochs cannot be cut short to trace the step, and
    its per-epoch list flattening grows with the rows too (about 20 s at 1x)."""
    users = inputs.schema.select_by_tag(Tags.USER_ID).first.int_domain.max + 1
    scale = {}
    for copies in config.benchmark.train.scale_factors:
        print(
            f"[benchmark-train] {copies}x: replicating the encoded rows in memory ({copies * rows:,} interactions)",
            flush=True,
        )
        scaled = replicated_users(inputs, copies)
        model, batches = recipe_side(config, scaled, "cached")
        model.keras.fit(batches.take(2), verbose=0)
        timed = timed_fit(
            model.keras, batches, 1, copies * rows, config.train.batch_size, f"recipe at {copies}x", warmup_epochs=0
        )
        scale[f"{copies}x"] = {
            "interactions": copies * rows,
            "users": copies * users,
            "epoch_s": timed["epoch_s"],
            "examples_per_s": timed["examples_per_s"],
        }
        del scaled, model, batches
        gc.collect()
    return scale


def side_labels(loader: str) -> dict[str, str]:
    return {
        "recipe": f"recipe ({loader} loader)",
        "recipe_merlin_loader": "recipe (mm.Loader)",
        "plain_keras": "plain tf.keras",
    }


def _epoch_table(report: dict, labels: dict[str, str]) -> str:
    """Where an epoch's time goes, per side: the loader alone, the step alone, the epoch."""
    profile, steps = report["profile"], report["steps_per_epoch"]
    lines = [
        f"{'1x, ' + format(steps, ',') + ' steps per epoch':<38}" + "".join(f"{labels[side]:>22}" for side in SIDES)
    ]
    rows = [
        ("loader alone, one epoch (s)", [profile["loader_s_per_epoch"][side] for side in SIDES], ".1f"),
        ("train step, resident batch (ms)", [profile["resident_step_ms"][side] for side in SIDES], ".0f"),
        ("steps x resident step (s)", [steps * profile["resident_step_ms"][side] / 1000 for side in SIDES], ".1f"),
        ("measured epoch, median (s)", [report[side]["epoch_s"] for side in SIDES], ".1f"),
        ("examples/s", [report[side]["examples_per_s"] for side in SIDES], ",.0f"),
        (
            "step time / plain tf.keras",
            [report[side]["epoch_s"] / report["plain_keras"]["epoch_s"] for side in SIDES],
            ".2f",
        ),
    ]
    for label, values, spec in rows:
        lines.append(f"{label:<38}" + "".join(f"{format(value, spec):>22}" for value in values))
    return "\n".join(lines)


def _profile_tables(profile: dict, labels: dict[str, str]) -> str:
    lines = [
        f"\nrecipe train step by part (tf.profiler, op ms per step summed over threads)\n"
        f"{'part':<48}{'forward':>9}{'backward':>10}{'share':>8}"
    ]
    for part, times in profile["recipe_step_parts"].items():
        lines.append(f"{part:<48}{times['forward_ms']:>9.1f}{times['backward_ms']:>10.1f}{times['share']:>8.0%}")
    for side in ("recipe", "plain_keras"):
        lines.append(f"\ntop ops, {labels[side]} ({profile['op_ms_per_step'][side]:.0f} op ms per step)")
        lines += [f"  {op['op']:<36}{op['ms_per_step']:>8.1f} ms{op['share']:>7.0%}" for op in profile["top_ops"][side]]
    return "\n".join(lines)


def _scale_table(scale: dict) -> str:
    columns = [Column("users", 8), Column("interactions", 14, ","), Column("epoch s", 10, ".1f")]
    columns.append(Column("examples/s", 12, ",.0f"))
    rows = [[name, row["interactions"], row["epoch_s"], row["examples_per_s"]] for name, row in scale.items()]
    return "\n" + text_table(columns, rows)


def run_train_benchmark(config: RecipeConfig) -> Path:
    from twotower.views.plots import plot_train_benchmark

    config = copy.deepcopy(config)
    config.model.name = "two_tower"  # what the plain tf.keras model implements, whatever model.name says
    check_comparable(config)
    bench, labels = config.benchmark, side_labels(config.train.loader)
    started = time.perf_counter()
    if not config.train_encoded_dir.exists():  # a fresh clone: the recipe's first two stages
        print(
            f"[benchmark-train] no encoded training data under {config.output_dir}; "
            "running the data and workflow stages"
        )
        pipeline.run_data(config)
        pipeline.run_workflow(config)
    inputs = load_training_inputs(config)
    rows, batch_size = int(inputs.train_dataset.to_ddf().shape[0].compute()), config.train.batch_size
    print(
        f"[benchmark-train] {config.data.dataset}: {rows:,} encoded training rows, batch {batch_size}, "
        f"{bench.train.epochs} epochs per side (the first not counted)",
        flush=True,
    )

    loaders = {
        "recipe": config.train.loader,
        "recipe_merlin_loader": "merlin",
        "plain_keras": "tf.data from NumPy arrays",
    }
    models, batches, loader_s, report = {}, {}, {}, {}
    for side in SIDES:
        if side == "plain_keras":
            models[side], batches[side] = plain_side(config, inputs)
        else:
            model, batches[side] = recipe_side(config, inputs, loaders[side])
            models[side] = model.keras
        loader_s[side] = loader_seconds(batches[side])
        print(f"[benchmark-train] {labels[side]}: loader alone {loader_s[side]:.1f} s per epoch", flush=True)
        report[side] = timed_fit(
            models[side], batches[side], bench.train.epochs, rows, batch_size, labels[side], warmup_epochs=1
        )
        report[side]["loader"] = loaders[side]

    print("[benchmark-train] profile: train steps on one resident batch, then a tf.profiler trace", flush=True)
    resident = {
        "recipe": resident_batch(cached_batches(inputs.train_dataset, batch_size, config.seed)),
        "plain_keras": resident_batch(batches["plain_keras"]),
    }
    resident_ms = {
        side: resident_step_ms(models[side], resident[side], bench.train.resident_batch_steps, labels[side])
        for side in resident
    }
    resident_ms["recipe_merlin_loader"] = resident_ms["recipe"]  # the same model and step; only the loader differs
    op_ms = {side: traced_op_ms(models[side], resident[side], bench.train.traced_steps) for side in resident}
    del models, batches, resident
    gc.collect()
    report["profile"] = {
        "loader_s_per_epoch": loader_s,
        "resident_step_ms": resident_ms,
        "op_ms_per_step": {side: sum(ms.values()) for side, ms in op_ms.items()},
        "recipe_step_parts": recipe_parts(op_ms["recipe"]),
        "top_ops": {side: top_op_types(ms) for side, ms in op_ms.items()},
        "traced_steps": bench.train.traced_steps,
    }
    report["scale"] = scale_epochs(config, inputs, rows)

    out_dir = output_folder(config, "train")
    report = {
        "date": date.today().isoformat(),
        "dataset": config.data.dataset,
        "machine": {"cores": os.cpu_count(), "tensorflow": tf.__version__},
        "rows": rows,
        "batch_size": batch_size,
        "steps_per_epoch": -(-rows // batch_size),
        **report,
        "ratio_step_time": report["recipe"]["epoch_s"] / report["plain_keras"]["epoch_s"],
        "ratio_step_time_merlin_loader": report["recipe_merlin_loader"]["epoch_s"] / report["plain_keras"]["epoch_s"],
        "scale_note": "users replicated in memory from the encoded training rows (new user ids per copy, "
        "user table grown to match), not re-encoded by NVTabular; the recipe with the cached loader",
        "config": config_to_dict(config),
        "total_seconds": time.perf_counter() - started,
    }
    json_path = write_report(report, out_dir / "train.json")
    plot_train_benchmark(report, labels, out_dir / "train.png")
    print("\n" + _epoch_table(report, labels))
    print(_profile_tables(report["profile"], labels))
    print(_scale_table(report["scale"]))
    print(f"total {report['total_seconds'] / 60:.1f} min; plot {out_dir / 'train.png'}")
    print(json_path)
    return json_path

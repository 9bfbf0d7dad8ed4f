"""make benchmark-train: the plain tf.keras model is the recipe's model (given the same weights,
the same vectors, loss and training steps), the cached loader hands fit mm.Loader's batches,
replicated users grow only the user base, and a small run writes its report."""

from __future__ import annotations

import collections
import copy
import json

import merlin.models.tf as mm
import numpy as np
import pytest
import tensorflow as tf

from twotower.benchmarks.support.plain_keras import build_plain_model, padded_arrays
from twotower.benchmarks.training import item_log_q, plain_layout, repeated_batch, replicated_users, run_train_benchmark
from twotower.stages.train import build_model, cached_batches, set_seeds

pytestmark = pytest.mark.smoke

BATCH = 64


def _layers(keras_object, kind) -> list:
    return [
        layer for layer in keras_object._flatten_layers(include_self=False, recursive=True) if isinstance(layer, kind)
    ]


def _copy_recipe_weights(recipe, plain) -> None:
    """Every table by name, and each tower's dense layers in order (shapes must match)."""
    tables = {table.name: table for table in _layers(recipe.keras, mm.EmbeddingTable)}
    assert set(tables) == set(plain.tables)
    for name, table in tables.items():
        plain.tables[name].set_weights(table.get_weights())
    for encoder, mlp in (
        (recipe.keras.query_encoder, plain.query_mlp),
        (recipe.keras.candidate_encoder, plain.item_mlp),
    ):
        mlp.set_weights([weight for dense in _layers(encoder, tf.keras.layers.Dense) for weight in dense.get_weights()])


def _one_step_loss(keras_model, batch) -> float:
    """The loss of one train step on ``batch`` (fit: train_on_batch refuses mm.Loader's layout)."""
    return keras_model.fit(repeated_batch(batch, 1), verbose=0).history["loss"][0]


def _row_keys(frame) -> collections.Counter:
    return collections.Counter(zip(frame["user_id"], frame["item_id"], map(tuple, frame["history"])))


def test_plain_keras_model_is_the_recipe_model_given_its_weights(prepared, inputs):
    frame = inputs.train_dataset.to_ddf().compute().head(BATCH)
    recipe_batch, _ = next(iter(mm.Loader(inputs.train_dataset, batch_size=BATCH, shuffle=False)))
    plain_batch = {name: tf.constant(values) for name, values in padded_arrays(frame, list(frame.columns)).items()}
    np.testing.assert_array_equal(recipe_batch["item_id"].numpy(), plain_batch["item_id"].numpy())  # the same rows
    # the batch holds the cases where a plain rewrite could differ: an empty history, an accidental hit
    assert (frame["history"].map(len) == 0).any() and frame["item_id"].duplicated().any()

    two_tower = copy.deepcopy(prepared)
    two_tower.model.name = "two_tower"  # what the plain model implements
    set_seeds(prepared.seed)
    recipe = build_model(two_tower, inputs)
    recipe.keras(recipe_batch)
    plain = build_plain_model(plain_layout(inputs.schema), prepared.train, item_log_q(inputs.item_counts))
    plain(plain_batch)
    _copy_recipe_weights(recipe, plain)

    query, item = plain(plain_batch)
    np.testing.assert_allclose(query, recipe.keras.query_encoder(recipe_batch), atol=1e-5)
    np.testing.assert_allclose(item, recipe.keras.candidate_encoder(recipe_batch), atol=1e-5)
    # The same loss, and after Adam steps on it still the same: same gradients, same optimizer.
    for _ in range(3):
        assert _one_step_loss(plain, plain_batch) == pytest.approx(_one_step_loss(recipe.keras, recipe_batch), rel=1e-4)


def test_cached_loader_gives_mm_loader_batches_in_a_new_order_each_epoch(inputs):
    frame = inputs.train_dataset.to_ddf().compute()
    batches = cached_batches(inputs.train_dataset, 256, seed=1)
    merlin_batch, _ = next(iter(mm.Loader(inputs.train_dataset, batch_size=256, shuffle=False)))
    epochs = []
    for _ in range(2):
        epoch = list(batches)
        assert {name: t.dtype for name, t in epoch[0].items()} == {name: t.dtype for name, t in merlin_batch.items()}
        epochs.append(np.concatenate([batch["item_id"].numpy() for batch in epoch]))
        rows = {
            "user_id": np.concatenate([batch["user_id"].numpy() for batch in epoch]),
            "item_id": epochs[-1],
            "history": [
                row.numpy()
                for batch in epoch
                for row in tf.RaggedTensor.from_row_splits(batch["history__values"], batch["history__offsets"])
            ],
        }
        assert _row_keys(rows) == _row_keys(frame)  # every row once, lists intact
    assert not np.array_equal(*epochs)


def test_replicated_users_grow_the_user_base_and_nothing_else(inputs):
    frame = inputs.train_dataset.to_ddf().compute()
    tripled = replicated_users(inputs, 3)
    rows = tripled.train_dataset.to_ddf().compute()
    user_domain = inputs.schema["user_id"].int_domain.max + 1
    assert len(rows) == 3 * len(frame)
    assert rows["user_id"].nunique() == 3 * frame["user_id"].nunique()
    assert tripled.schema["user_id"].int_domain.max == 3 * user_domain - 1 >= rows["user_id"].max()
    third = rows.iloc[2 * len(frame) :].reset_index(drop=True)
    assert (third["user_id"] == frame["user_id"] + 2 * user_domain).all()
    assert third.drop(columns="user_id").astype(str).equals(frame.drop(columns="user_id").astype(str))
    np.testing.assert_array_equal(item_log_q(tripled.item_counts), item_log_q(inputs.item_counts))


def test_small_run_writes_the_report_whose_path_is_printed_last(prepared, capsys):
    config = copy.deepcopy(prepared)
    config.benchmark.train.epochs = 2
    config.benchmark.train.resident_batch_steps = 4
    config.benchmark.train.traced_steps = 2
    config.benchmark.train.scale_factors = [1, 2]
    path = run_train_benchmark(config)
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(path)
    report = json.loads(path.read_text())
    for side in ("recipe", "recipe_merlin_loader", "plain_keras"):
        assert report[side]["examples_per_s"] > 0 and len(report[side]["epochs_s"]) == 1, side
    assert report["ratio_step_time"] == pytest.approx(report["recipe"]["epoch_s"] / report["plain_keras"]["epoch_s"])
    profile = report["profile"]
    assert (
        set(profile["loader_s_per_epoch"])
        == set(profile["resident_step_ms"])
        == {"recipe", "recipe_merlin_loader", "plain_keras"}
    )
    assert sum(part["share"] for part in profile["recipe_step_parts"].values()) == pytest.approx(1.0)
    assert profile["recipe_step_parts"]["softmax cross-entropy"]["forward_ms"] > 0
    assert all(profile["top_ops"][side] for side in ("recipe", "plain_keras"))
    assert list(report["scale"]) == ["1x", "2x"]
    assert report["scale"]["2x"]["interactions"] == 2 * report["scale"]["1x"]["interactions"] == 2 * report["rows"]
    assert (path.parent / "train.png").stat().st_size > 0

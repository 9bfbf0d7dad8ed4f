"""The two-tower family: the registry, each model's mechanism, the losses, and each model served.

Mechanism tests use tiny hand-made tensors or the small prepared synthetic run; the
served tests train each model for one epoch and compare a real Triton server's answers
with the in-process model's own top-k.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import get_args

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from twotower.config import ConfigError, ModelName, load_config, set_value
from twotower.models import REGISTRY, builder, model_names
from twotower.models.base import HISTORY
from twotower.models.dat import AugmentedVector, category_alignment_loss, mimic_loss
from twotower.models.gating import FieldGate, LightSE, SENet
from twotower.models.hstu import HSTUEncoder
from twotower.models.losses import BCELoss, BPRLoss, SoftmaxLoss
from twotower.models.sequence import CausalSelfAttention, GRUEncoder
from twotower.stages.train import load_training_inputs

pytestmark = pytest.mark.smoke


def test_registry_cli_and_configuration_list_the_same_models():
    listed = subprocess.run(
        [sys.executable, "-m", "twotower", "models"], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert listed.splitlines() == model_names() == list(get_args(ModelName)) == list(REGISTRY)
    with pytest.raises(ConfigError, match="one of 'two_tower'"):
        load_config(overrides=["model.name=sasrec"])
    with pytest.raises(ConfigError, match="model.sequence.heads"):
        load_config(overrides=["model.sequence.heads=two"])


# ---------------------------------------------------------------------- losses
LOGITS = np.array([[2.0, 1.0, 0.0, -1.0], [0.5, 1.5, -1.0, 0.0]], dtype=np.float32)
POSITIVE_FIRST = np.array([[1, 0, 0, 0], [1, 0, 0, 0]], dtype=np.float32)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_softmax_loss_by_hand():
    expected = np.mean([-np.log(np.exp(row[0]) / np.exp(row).sum()) for row in LOGITS])
    assert float(SoftmaxLoss()(POSITIVE_FIRST, LOGITS)) == pytest.approx(expected, rel=1e-5)


def test_bpr_loss_by_hand():
    expected = np.mean([np.mean([-np.log(_sigmoid(row[0] - negative)) for negative in row[1:]]) for row in LOGITS])
    assert float(BPRLoss()(POSITIVE_FIRST, LOGITS)) == pytest.approx(expected, rel=1e-5)


def test_bce_loss_by_hand():
    expected = np.mean(
        [-np.log(_sigmoid(row[0])) + np.mean([-np.log(1 - _sigmoid(n)) for n in row[1:]]) for row in LOGITS]
    )
    assert float(BCELoss()(POSITIVE_FIRST, LOGITS)) == pytest.approx(expected, rel=1e-5)


def test_losses_read_the_positive_from_y_true_not_its_column():
    moved = np.array([[0, 0, 1, 0], [0, 1, 0, 0]], dtype=np.float32)
    for loss in (SoftmaxLoss(), BPRLoss(), BCELoss()):
        assert float(loss(moved, LOGITS)) != pytest.approx(float(loss(POSITIVE_FIRST, LOGITS)))
        permuted = LOGITS[:, [2, 1, 0, 3]], LOGITS[:, [1, 0, 2, 3]]
        swapped = np.stack([permuted[0][0], permuted[1][1]])
        assert float(loss(moved, swapped)) == pytest.approx(float(loss(POSITIVE_FIRST, LOGITS)), rel=1e-6)


# ---------------------------------------------------------------------- gating
FIELDS = tf.constant(np.random.default_rng(0).normal(size=(2, 3, 4)), dtype=tf.float32)  # batch 2, 3 fields, dim 4


def test_senet_squeezes_excites_and_rescales_by_hand():
    senet = SENet(reduction=2)
    out = senet(FIELDS).numpy()
    (w1, b1), (w2, b2) = senet.squeeze_layer.get_weights(), senet.excite_layer.get_weights()
    assert w1.shape == (3, 1) and w2.shape == (1, 3)  # fields -> fields // 2 -> fields
    squeezed = FIELDS.numpy().mean(axis=-1)
    weights = _sigmoid(np.maximum(squeezed @ w1 + b1, 0) @ w2 + b2)
    np.testing.assert_allclose(senet.field_weights(FIELDS).numpy(), weights, rtol=1e-5)
    np.testing.assert_allclose(out, FIELDS.numpy() * weights[..., None], rtol=1e-5)


def test_light_se_is_one_bias_free_layer_softmax_over_fields_with_residual():
    light = LightSE()
    out = light(FIELDS).numpy()
    (kernel,) = light.excite_layer.get_weights()  # no bias
    assert kernel.shape == (3, 3)
    logits = FIELDS.numpy().mean(axis=-1) @ kernel
    weights = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(light.field_weights(FIELDS).numpy().sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out, FIELDS.numpy() + FIELDS.numpy() * weights[..., None], rtol=1e-5)


def test_field_gate_stacks_fields_in_name_order_and_flattens():
    fields = {"b": FIELDS[:, 1], "a": FIELDS[:, 0], "c": FIELDS[:, 2]}
    gate = FieldGate(LightSE())
    out = gate(fields).numpy()
    assert out.shape == (2, 12)
    np.testing.assert_allclose(out.reshape(2, 3, 4), gate.gate(FIELDS).numpy(), rtol=1e-6)


# ------------------------------------------------------------------- the models
def _build(prepared, inputs, **settings):
    config = copy.deepcopy(prepared)
    for key, value in settings.items():
        set_value(config, key.replace("__", "."), value)
    return builder(config.model.name)(inputs.schema, inputs.stats, config.train, config.model)


def _fit_one_epoch(model, inputs):
    import merlin.models.tf as mm

    history = model.keras.fit(mm.Loader(inputs.train_dataset, batch_size=256, shuffle=True), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    return history.history


def _layers(keras_object, kind):
    return [
        layer for layer in keras_object._flatten_layers(include_self=False, recursive=True) if isinstance(layer, kind)
    ]


@pytest.mark.parametrize("gating", ["senet", "light_se"])
def test_gating_runs_in_both_towers_and_changes_their_output(prepared, inputs, gating):
    model = _build(prepared, inputs, model__name="two_tower", model__gating=gating)
    _fit_one_epoch(model, inputs)
    kind = SENet if gating == "senet" else LightSE
    query_gates, item_gates = _layers(model.keras.query_encoder, kind), _layers(model.keras.candidate_encoder, kind)
    assert len(query_gates) == len(item_gates) == 1
    users = inputs.valid_users.head(20)
    before = model.query_vectors(users)
    gate = query_gates[0]
    gate.excite_layer.set_weights([w * 5.0 for w in gate.excite_layer.get_weights()])
    assert not np.allclose(model.query_vectors(users), before, atol=1e-4)


def test_dat_mimic_loss_by_hand_and_it_stops_the_other_towers_gradient():
    augmented = tf.Variable([[1.0, 0.0], [0.0, 1.0]])
    other = tf.Variable([[0.0, 1.0], [0.0, 1.0]])
    with tf.GradientTape() as tape:
        loss = mimic_loss(augmented, other)
    assert float(loss) == pytest.approx(1.0)  # (1 + 1 + 0 + 0) / 2 pairs
    grad_augmented, grad_other = tape.gradient(loss, [augmented, other])
    assert grad_other is None and np.abs(grad_augmented.numpy()).sum() > 0


def test_dat_category_alignment_loss_by_hand():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(7, 3)).astype(np.float32)
    membership = np.zeros((7, 4), np.float32)
    membership[[0, 1, 2, 3], 0] = 1  # the largest category
    membership[[3, 4, 5], 1] = 1  # items may be in several
    membership[[6], 2] = 1  # one row: no covariance, left out; category 3 empty
    largest = np.cov(vectors[[0, 1, 2, 3]], rowvar=False)
    expected = ((largest - np.cov(vectors[[3, 4, 5]], rowvar=False)) ** 2).sum()
    assert float(category_alignment_loss(tf.constant(vectors), tf.constant(membership))) == pytest.approx(
        expected, rel=1e-4
    )


def test_dat_augmented_vector_is_an_input_of_the_query_tower(prepared, inputs):
    model = _build(prepared, inputs, model__name="dat")
    _fit_one_epoch(model, inputs)
    (user_augment,) = _layers(model.keras.query_encoder, AugmentedVector)
    assert user_augment.column == "user_id"
    users = inputs.valid_users.head(10)
    before = model.query_vectors(users)
    table = user_augment.table.get_weights()[0]
    changed_code = int(users["user_id"].iloc[0])
    table[changed_code] += 3.0
    user_augment.table.set_weights([table])
    after = model.query_vectors(users)
    moved = ~np.isclose(before, after, atol=1e-5).all(axis=1)
    np.testing.assert_array_equal(moved, users["user_id"].to_numpy() == changed_code)


def test_dat_losses_run_over_the_batch_positive_pairs(prepared, inputs):
    import merlin.models.tf as mm

    model = _build(prepared, inputs, model__name="dat", model__dat__alignment_weight=0.0)
    history = _fit_one_epoch(model, inputs)
    assert history["regularization_loss"][0] > 0  # the mimic terms reach the optimised loss
    features, _ = next(iter(mm.Loader(inputs.train_dataset, batch_size=64, shuffle=False)))
    keras = model.keras
    rng = np.random.default_rng(3)
    for augment in (keras.user_augment, keras.item_augment):  # far from the towers, so pairings differ
        augment.table.set_weights([3.0 * rng.normal(size=augment.table.get_weights()[0].shape)])
    prepared_features = keras.query_encoder._prepare_features(features) | keras.candidate_encoder._prepare_features(
        features
    )
    query, candidate = keras.query_encoder(features).numpy(), keras.candidate_encoder(features).numpy()
    a_u = keras.user_augment.lookup(prepared_features["user_id"]).numpy()
    a_v = keras.item_augment.lookup(prepared_features["item_id"]).numpy()

    def mimic(users_side, items_side):
        return 0.5 * np.mean(np.sum((a_u - users_side) ** 2, axis=1)) + 0.5 * np.mean(
            np.sum((a_v - items_side) ** 2, axis=1)
        )

    value = float(keras.dat_losses(prepared_features, tf.constant(query), tf.constant(candidate)))
    assert value == pytest.approx(mimic(candidate, query), rel=1e-5)  # a_u against its own positive's p_v
    assert value != pytest.approx(mimic(np.roll(candidate, 1, axis=0), np.roll(query, 1, axis=0)), abs=1e-2)


@pytest.mark.parametrize(
    "encoder",
    [
        CausalSelfAttention(max_length=6, heads=2, dropout=0.0),
        GRUEncoder(dropout=0.0),
        HSTUEncoder(max_length=6, heads=2, dropout=0.0),
    ],
    ids=["attention", "gru", "hstu"],
)
def test_sequence_encoders_are_causal(encoder):
    rng = np.random.default_rng(2)
    sequence = rng.normal(size=(1, 6, 8)).astype(np.float32)
    mask = tf.ones([1, 6], tf.bool)
    out = encoder(tf.constant(sequence), mask).numpy()
    changed = sequence.copy()
    changed[0, 3] += 1.0
    out_changed = encoder(tf.constant(changed), mask).numpy()
    np.testing.assert_allclose(out_changed[0, :3], out[0, :3], atol=1e-5)  # no position sees a later item
    assert not np.allclose(out_changed[0, 3:], out[0, 3:], atol=1e-4)


def _with_reversed_history(users: pd.DataFrame) -> pd.DataFrame:
    return users.assign(**{HISTORY: users[HISTORY].map(lambda items: list(items)[::-1])})


@pytest.mark.parametrize("name", ["seq_attention", "seq_gru"])  # seq_hstu: tests/models/test_next_item.py
def test_history_order_matters_to_sequence_towers_but_not_to_mean_pooling(prepared, inputs, name):
    users = inputs.valid_users[inputs.valid_users[HISTORY].map(lambda items: len(set(items)) >= 3)].head(20)
    assert len(users) > 5
    sequence, pooled = _build(prepared, inputs, model__name=name), _build(prepared, inputs, model__name="two_tower")
    _fit_one_epoch(sequence, inputs)
    _fit_one_epoch(pooled, inputs)
    reordered = _with_reversed_history(users)
    np.testing.assert_allclose(pooled.query_vectors(reordered), pooled.query_vectors(users), atol=1e-5)
    assert not np.allclose(sequence.query_vectors(reordered), sequence.query_vectors(users), atol=1e-4)
    first = users.head(2)  # an empty history next to a full one (alone, the served test sends one)
    one_empty = first.assign(**{HISTORY: pd.Series([[], first[HISTORY].iloc[1]], index=first.index, dtype=object)})
    assert np.isfinite(sequence.query_vectors(one_empty)).all()


def test_whole_sequence_windows_make_every_positive_but_the_first_a_target_once():
    from twotower.stages.train import windows

    assert windows(list(range(1, 11)), 3) == [[1, 2, 3, 4], [4, 5, 6, 7], [7, 8, 9, 10]]
    assert windows([1, 2, 3, 4, 5], 3) == [[1, 2], [2, 3, 4, 5]]  # the latest window full, as served
    assert windows([1, 2], 3) == [[1, 2]] and windows([1], 3) == []


def test_whole_sequence_batches_train_only_the_positions_a_warm_start_keeps(prepared, inputs):
    """Retrain's new positives: every history is read whole, but only the kept positions are
    targets (the others predict the padding code, which the trainer skips), and windows without a
    kept position are left out."""
    import dataclasses

    from twotower.stages.train import whole_sequence_batches

    config = copy.deepcopy(prepared)
    config.model.sequence.batch_windows = 10_000  # one batch
    users = inputs.sequence_users
    latest_only = users[HISTORY].map(lambda items: [False] * (len(items) - 1) + [True] if len(items) else [])
    narrowed = dataclasses.replace(inputs, sequence_targets=latest_only)
    ((features, next_items),) = list(whole_sequence_batches(config, narrowed))
    trained = users[users[HISTORY].map(len) >= 2]
    assert next_items.shape[0] == len(trained)  # one window each: the latest
    targets = next_items.to_list()
    assert all(row[:-1] == [0] * (len(row) - 1) for row in targets)
    assert sorted(row[-1] for row in targets) == sorted(trained[HISTORY].map(lambda items: items[-1]))
    model = _build(prepared, inputs, model__name="seq_attention")
    model.query_vectors(users.head(2))
    trainer = model.next_item_trainer(inputs.catalogue.features, inputs.item_counts, config.train, "softmax", 64)
    _, _, valid = trainer.encode((features, next_items), False)
    assert int(valid.numpy().sum()) == len(trained)


@pytest.mark.parametrize("name", ["seq_attention", "seq_hstu"])
def test_whole_sequence_training_reads_each_position_as_the_served_tower_reads_that_prefix(prepared, inputs, name):
    from twotower.models.losses import feature_tensors

    model = _build(prepared, inputs, model__name=name, model__sequence__training="whole_sequence")
    users = inputs.valid_users[inputs.valid_users[HISTORY].map(len) >= 3].head(4)
    model.query_vectors(users)  # creates the towers' variables
    config = copy.deepcopy(prepared)
    trainer = model.next_item_trainer(inputs.catalogue.features, inputs.item_counts, config.train, "softmax", 64)
    features = feature_tensors(users, model.query_schema)
    queries, targets, valid = trainer.encode((features, features[HISTORY]), False)
    lengths = users[HISTORY].map(len).to_numpy()
    np.testing.assert_array_equal(valid.numpy().sum(axis=1), lengths)
    for row, (_, user) in enumerate(users.iterrows()):
        history = list(user[HISTORY])
        prefixes = pd.DataFrame([user] * len(history)).assign(
            **{HISTORY: [history[: p + 1] for p in range(len(history))]}
        )
        np.testing.assert_allclose(queries.numpy()[row, : len(history)], model.query_vectors(prefixes), atol=1e-5)
    loss = trainer.step((features, features[HISTORY]))
    assert np.isfinite(float(loss))


# ------------------------------------------------------------- each one served
SERVED = {
    "dat+senet/bce": {"model.name": "dat", "model.gating": "senet", "model.loss": "bce"},
    "seq_attention+light_se/bpr/per_row": {
        "model.name": "seq_attention",
        "model.gating": "light_se",
        "model.loss": "bpr",
        "model.sequence.training": "per_row",
    },
    "seq_gru": {"model.name": "seq_gru"},
    "seq_hstu": {"model.name": "seq_hstu"},
}


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.parametrize("variant", list(SERVED))
def test_each_model_is_served_with_its_in_process_top_k(prepared, variant):
    import dataclasses

    from twotower import pipeline
    from twotower.benchmarks.models import run_folder
    from twotower.serving.client import recommend
    from twotower.serving.triton import TritonServer
    from twotower.stages.train import train_and_save
    from twotower.store.artifacts import known_before_test

    config = run_folder(
        prepared,
        prepared,
        variant.replace("/", "_").replace("+", "_"),
        {**SERVED[variant], "train.epochs": 1},
        prepared.seed,
    )
    model, _ = train_and_save(config, verbose=0)
    for stage in (pipeline.run_index, pipeline.run_features, pipeline.run_export):
        stage(config)

    inputs = load_training_inputs(config)
    users = inputs.split.test["user_id"].drop_duplicates().head(8).to_numpy()
    scores = model.query_vectors(inputs.test_users.loc[users]) @ model.item_vectors(inputs.catalogue.features).T
    known = known_before_test(inputs.split)
    for row, user in enumerate(users):
        scores[row, np.isin(inputs.catalogue.item_ids, known.loc[known["user_id"] == user, "item_id"])] = -np.inf
    expected = inputs.catalogue.item_ids[np.argsort(-scores, axis=1, kind="stable")[:, : config.serve.top_k]]

    serve = dataclasses.replace(config.serve, grpc_port=0, http_port=0, metrics_port=0)
    with TritonServer(config.export_dir, config.output_dir / "triton", serve) as server:
        answer = recommend(users, server.grpc_url, timeout_s=60)
        unknown = recommend([-5], server.grpc_url, timeout_s=60)
    np.testing.assert_array_equal(answer["item_ids"], expected)
    assert not answer["is_fallback"].any() and unknown["is_fallback"].all()

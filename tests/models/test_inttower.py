"""IntTower's mechanisms (FE-Block, CIR) against NumPy, and make benchmark-prerank's protocol.

Tiny hand-made tensors and frames; one short run of the benchmark on a small synthetic set.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from twotower.benchmarks.prerank import (
    ITEM_FIELDS,
    LABEL,
    MODELS,
    SETUPS,
    USER_FIELDS,
    Prepared,
    build,
    click_rows,
    mean_rating_features,
    mean_rating_sources,
    prerank_split,
    run_prerank_benchmark,
)
from twotower.config import load_config
from twotower.models.inttower import FEBlock, HeadsTower, contrastive_interaction_loss, fe_score, head_sources

pytestmark = pytest.mark.unit


def _numpy_fe_score(user_heads: list[np.ndarray], item_heads: np.ndarray) -> np.ndarray:
    """Loops, no einsum: for each row, layer and user head, the best item head's dot product."""
    scores = np.zeros(item_heads.shape[0])
    for row in range(item_heads.shape[0]):
        for heads in user_heads:
            for user_head in heads[row]:
                scores[row] += max(float(user_head @ item_head) for item_head in item_heads[row])
    return scores


def test_fe_block_head_shapes():
    block = FEBlock(user_layers=2, user_heads=3, item_heads=5, head_size=4)
    user_outputs = [tf.ones([6, 10]), tf.ones([6, 7])]
    user_heads, item_heads = block.heads(user_outputs, tf.ones([6, 8]))
    assert [tuple(h.shape) for h in user_heads] == [(6, 3, 4), (6, 3, 4)]
    assert tuple(item_heads.shape) == (6, 5, 4)
    assert tuple(block((user_outputs, tf.ones([6, 8]))).shape) == (6,)


@pytest.mark.parametrize("heads_from", ["layer_inputs", "layer_outputs"])
def test_user_heads_project_each_layers_input_or_output(heads_from):
    """Layer 0's heads come from the tower's input (the official code) or from layer 0's
    output (the paper); layer 1's from layer 0's output or layer 1's."""
    tower = HeadsTower([3, 2], projected=[0, 1], heads=2, head_size=4, normalize=False, heads_from=heads_from)
    tower_input = tf.constant(np.random.default_rng(0).normal(size=(5, 6)), tf.float32)
    heads = tower(tower_input).numpy().reshape(5, 2, 2, 4)  # [batch, layer, head, size]
    first = tower.mlp[0](tower_input)
    second = tower.mlp[1](first)
    sources = [tower_input, first] if heads_from == "layer_inputs" else [first, second]
    for layer, (project, source) in enumerate(zip(tower.projections, sources)):
        np.testing.assert_allclose(heads[:, layer], project(source).numpy(), rtol=1e-5, atol=1e-6)


def test_an_unknown_head_source_is_refused_not_taken_for_layer_outputs():
    with pytest.raises(ValueError, match="heads_from='layer_input'"):
        HeadsTower([3], projected=[0], heads=2, head_size=4, normalize=False, heads_from="layer_input")
    with pytest.raises(ValueError, match="layer_outputs, layer_inputs"):
        head_sources(tf.zeros([1, 2]), [tf.zeros([1, 3])], [0], "outputs")


def test_fe_score_equals_the_max_over_item_heads_by_hand():
    rng = np.random.default_rng(0)
    user_heads = [rng.normal(size=(2, 3, 4)).astype(np.float32) for _ in range(2)]
    item_heads = rng.normal(size=(2, 5, 4)).astype(np.float32)
    expected = _numpy_fe_score(user_heads, item_heads)
    np.testing.assert_allclose(
        fe_score([tf.constant(h) for h in user_heads], tf.constant(item_heads)).numpy(), expected, rtol=1e-5
    )
    # the layer's score is fe_score of its own projections
    block = FEBlock(user_layers=1, user_heads=2, item_heads=3, head_size=4)
    user_out, item_out = (
        tf.constant(rng.normal(size=(2, 6)), tf.float32),
        tf.constant(rng.normal(size=(2, 5)), tf.float32),
    )
    projected_user, projected_item = block.heads([user_out], item_out)
    np.testing.assert_allclose(
        block(([user_out], item_out)).numpy(),
        _numpy_fe_score([projected_user[0].numpy()], projected_item.numpy()),
        rtol=1e-5,
    )


def test_fe_score_ignores_item_head_order_but_not_which_head_is_max():
    user = [tf.constant([[[1.0, 0.0], [0.0, 1.0]]])]  # two user heads along the axes
    items = np.array([[[2.0, 0.0], [0.0, 1.0], [0.5, 0.5]]], dtype=np.float32)
    score = float(fe_score(user, tf.constant(items))[0])
    assert score == pytest.approx(2.0 + 1.0)  # head 1 takes item head 0, head 2 item head 1
    assert float(fe_score(user, tf.constant(items[:, ::-1].copy()))[0]) == pytest.approx(score)
    changed = items.copy()
    changed[0, 2] = [0.0, 3.0]  # now the third item head is the best match of the second user head
    assert float(fe_score(user, tf.constant(changed))[0]) == pytest.approx(2.0 + 3.0)
    # a mean over item heads (not a max) would give another number: the max is what is computed
    assert score != pytest.approx(float(np.einsum("hd,kd->hk", user[0][0].numpy(), items[0]).mean(axis=1).sum()))


def test_cir_equals_numpy_infonce_on_three_rows():
    user = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0], [3.0, 0.0, 1.0]], dtype=np.float32)
    item = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, -1.0]], dtype=np.float32)
    labels = np.array([1.0, 0.0, 1.0], dtype=np.float32)
    temperature = 0.5
    u = user / np.linalg.norm(user, axis=1, keepdims=True)
    v = item / np.linalg.norm(item, axis=1, keepdims=True)
    logits = u @ v.T / temperature
    expected = np.array([-(logits[i, i] - np.log(np.exp(logits[i]).sum())) for i in range(3)]) * labels
    got = contrastive_interaction_loss(tf.constant(user), tf.constant(item), tf.constant(labels), temperature).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert got[1] == 0.0 and got[0] > 0.0
    # heads [batch, heads, size] are flattened first
    heads = contrastive_interaction_loss(
        tf.reshape(user, [3, 3, 1]), tf.reshape(item, [3, 1, 3]), tf.constant(labels), temperature
    )
    np.testing.assert_allclose(heads.numpy(), expected, rtol=1e-5)


# ---------------------------------------------------------------------- protocol
def _ratings(n: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "user_id": rng.integers(1, 20, n),
            "item_id": rng.integers(1, 30, n),
            "rating": rng.integers(1, 6, n).astype(np.float32),
            "timestamp": rng.permutation(n) + 1_000,
        }
    )


def test_protocol_drops_rating_3_and_splits_80_20_with_validation_last():
    ratings = _ratings()
    rows = click_rows(ratings)
    assert (rows["rating"] != 3).all() and len(rows) == int((ratings["rating"] != 3).sum())
    assert (rows[LABEL] == (rows["rating"] > 3)).all()
    split = prerank_split(rows, 0.2, 0.2, seed=7)
    n = len(rows)
    assert len(split.test) == math.ceil(0.2 * n)
    training = len(split.train) + len(split.valid)
    assert training == n - len(split.test) and len(split.train) == int(0.8 * training)
    # the training part is the seeded permutation of the time-sorted rows; validation is its tail
    ordered = rows.sort_values("timestamp", kind="stable").reset_index(drop=True)
    permutation = np.random.RandomState(7).permutation(n)
    expected_training = ordered.iloc[permutation[len(split.test) :]]
    pd.testing.assert_frame_equal(split.valid, expected_training.iloc[len(split.train) :].reset_index(drop=True))
    assert set(split.test["timestamp"]).isdisjoint(set(pd.concat([split.train, split.valid])["timestamp"]))


def _test_features(split, setup: str) -> dict[str, np.ndarray]:
    return mean_rating_features(mean_rating_sources(split, setup)["test"], split.test)


def test_train_mean_rating_of_test_rows_ignores_test_labels():
    split = prerank_split(click_rows(_ratings(400)), 0.2, 0.2, seed=1)
    flipped = dataclasses.replace(split, test=split.test.assign(**{LABEL: 1.0 - split.test[LABEL]}))
    for name, values in _test_features(split, "train_mean_rating").items():
        np.testing.assert_array_equal(values, _test_features(flipped, "train_mean_rating")[name])
    # the official code's features do read the test labels: the comparison setup leaks, as it should
    assert not np.array_equal(
        _test_features(split, "split_mean_rating")["user_mean_rating"],
        _test_features(flipped, "split_mean_rating")["user_mean_rating"],
    )
    assert mean_rating_sources(split, "no_mean_rating") == {}
    # unseen ids get the training mean
    unseen = pd.DataFrame({"user_id": [10_000], "item_id": [10_000], LABEL: [1.0]})
    assert mean_rating_features(split.train, unseen)["user_mean_rating"][0, 0] == pytest.approx(
        split.train[LABEL].mean()
    )


@pytest.mark.smoke
@pytest.mark.timeout(300)
def test_benchmark_prerank_smoke_run_writes_every_row(tmp_path, capsys):
    config = load_config(
        overrides=[
            "data.dataset=synthetic",
            "data.synthetic_users=60",
            "data.synthetic_items=40",
            "benchmark.prerank.epochs=1",
            "benchmark.prerank.batch_size=128",
            "benchmark.prerank.sample_rows=1200",
            "benchmark.prerank.tower_layers=[16, 16, 8]",
            "benchmark.prerank.inttower.user_heads=4",
            "benchmark.prerank.inttower.item_heads=4",
            "benchmark.prerank.inttower.head_size=8",
        ]
    )
    config.output_dir = tmp_path
    path = run_prerank_benchmark(config)
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(path)
    report = json.loads(path.read_text())
    assert set(report["rows"]) == set(SETUPS)
    for setup in SETUPS:
        assert set(report["rows"][setup]) == set(MODELS)
        for row in report["rows"][setup].values():
            assert 0.0 <= row["auc"] <= 1.0 and row["logloss"] > 0.0 and row["epochs_run"] == 1
    assert report["paper"]["inttower"] == {"auc": 0.8974, "logloss": 0.3128}
    assert report["data"]["test"] > 0


def test_inttower_click_logit_is_the_mean_or_the_sum_of_the_fe_terms():
    """The inttower row's logit (bias aside) is the FE score of its own heads over the 2 layers x 3
    user heads terms (``mean``) or the score itself (``sum``, the official code), same weights."""
    rng = np.random.default_rng(0)
    rows = 5
    features = {
        **{field: rng.integers(0, 3, rows) for field in ("user_id", "gender", "age", "occupation", "item_id")},
        "genres": rng.integers(0, 4, (rows, 2)),
    }
    prepared = Prepared(
        {}, {"user": (), "item": ()}, {"user_id": 3, "gender": 3, "age": 3, "occupation": 3, "item_id": 3, "genres": 4}
    )
    config = load_config(
        overrides=[
            "benchmark.prerank.tower_layers=[8, 6]",
            "benchmark.prerank.init_std=0.5",
            "benchmark.prerank.inttower.fe_layers=[0, 1]",
            "benchmark.prerank.inttower.user_heads=3",
            "benchmark.prerank.inttower.item_heads=2",
            "benchmark.prerank.inttower.head_size=4",
            "benchmark.prerank.inttower.cir_weight=0",  # CIR pairs heads one to one; 3 user heads against 2 item heads
        ]
    )
    settings = config.benchmark.prerank
    assert settings.inttower_logit == "mean"
    model = build("inttower", prepared, settings, config.model)
    mean = model.logits(features, training=False).numpy()
    model.settings = dataclasses.replace(settings, inttower_logit="sum")
    total = model.logits(features, training=False).numpy()

    user_input, user = model.user_tower(model.embeddings(features, USER_FIELDS), features)
    _, item = model.item_tower(model.embeddings(features, ITEM_FIELDS), features)
    user_heads, item_heads = model.fe.heads(
        head_sources(user_input, user, [0, 1], settings.inttower.user_heads_from), item[-1]
    )
    expected = _numpy_fe_score([heads.numpy() for heads in user_heads], item_heads.numpy())
    np.testing.assert_allclose(total, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mean, expected / 6, rtol=1e-4, atol=1e-6)
    assert np.abs(expected).max() > 1e-3  # a score of zeros would pass both

"""model.name=inttower as a retriever: the registry model scored by the FE score, CIR in its loss,
the multi-vector FAISS retriever against exact scoring, the refusal to serve it, and its row in
make benchmark-models.

The model tests train a few steps on the session's small synthetic run; the retriever tests use
hand-made head vectors.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import tensorflow as tf
from conftest import registry_model

from twotower.config import IntTowerConfig, PrerankConfig
from twotower.models.inttower import HeadLayout, IntTowerRetrievalModel, fe_score_matrix
from twotower.models.multi_vector import multi_vector_top_k, overlap_at_k
from twotower.stages.evaluate import EvalSet, build_eval_set, evaluate_scores, top_k_positions
from twotower.stages.train import evaluate_model, training_batches

pytestmark = pytest.mark.smoke


def _numpy_fe_scores(query_heads: np.ndarray, item_heads: np.ndarray) -> np.ndarray:
    """[users, items]: for each pair, the sum over query heads of the best item head's dot product."""
    scores = np.zeros((len(query_heads), len(item_heads)))
    for user, heads in enumerate(query_heads):
        for item, candidates in enumerate(item_heads):
            scores[user, item] = sum(max(float(head @ candidate) for candidate in candidates) for head in heads)
    return scores


def _numpy_infonce(users: np.ndarray, items: np.ndarray, temperature: float) -> float:
    """Mean over rows of -log softmax of the row's own item among the batch's, on cosines."""
    u = users / np.linalg.norm(users, axis=1, keepdims=True)
    v = items / np.linalg.norm(items, axis=1, keepdims=True)
    logits = u @ v.T / temperature
    return float(np.mean([np.log(np.exp(row).sum()) - row[i] for i, row in enumerate(logits)]))


# ------------------------------------------------------------------ configuration
def test_retriever_defaults_are_small_and_benchmark_prerank_keeps_the_official_ones():
    retriever, official = IntTowerConfig(), PrerankConfig().inttower
    assert (retriever.user_heads, retriever.item_heads, retriever.head_size, retriever.fe_layers) == (4, 4, 32, [0, 1])
    assert (official.user_heads, official.item_heads, official.head_size, official.fe_layers) == (32, 32, 64, [0, 1, 2])
    assert (retriever.user_heads_from, official.user_heads_from) == ("layer_outputs", "layer_inputs")


# ------------------------------------------------------------------ the registry model
def _inttower(prepared, inputs, **settings):
    return registry_model(prepared, inputs, "inttower", **settings)


def _fit_steps(config, model, inputs, steps: int = 3) -> dict:
    history = model.keras.fit(training_batches(config, inputs.train_dataset).take(steps), epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0])
    return history


def test_inttower_trains_and_evaluation_ranks_by_the_fe_score_of_its_vectors(prepared, inputs):
    config, model = _inttower(prepared, inputs)
    assert isinstance(model, IntTowerRetrievalModel)
    users = inputs.valid_users.head(12)
    before = model.query_vectors(users)
    _fit_steps(config, model, inputs)
    query, items = model.query_vectors(users), model.item_vectors(inputs.catalogue.features)
    assert not np.allclose(query, before, atol=1e-4)  # the steps trained the query tower
    fe = config.model.inttower
    assert query.shape == (12, len(fe.fe_layers) * fe.user_heads * fe.head_size)
    assert items.shape == (len(inputs.catalogue.item_ids), fe.item_heads * fe.head_size)
    query_heads = query.reshape(12, -1, fe.head_size)
    item_heads = items.reshape(len(items), fe.item_heads, fe.head_size)
    np.testing.assert_allclose(np.linalg.norm(item_heads, axis=-1), 1.0, rtol=1e-5)  # each head L2-normalised
    expected = _numpy_fe_scores(query_heads, item_heads)
    np.testing.assert_allclose(model.score(query, items), expected, rtol=1e-4, atol=1e-4)

    # evaluate_model (test metrics and early stopping) ranks by that score
    split = inputs.split
    eval_set = build_eval_set(split.valid, split.train, inputs.catalogue.item_ids)
    all_users = model.query_vectors(inputs.valid_users.loc[eval_set.user_ids])
    by_hand = _numpy_fe_scores(all_users.reshape(len(all_users), -1, fe.head_size), item_heads)
    assert evaluate_model(model, eval_set, inputs.valid_users, inputs.catalogue) == pytest.approx(
        evaluate_scores(lambda rows: by_hand[rows], eval_set)
    )


def test_cir_reaches_the_loss_and_pairs_each_user_with_its_own_item(prepared, inputs):
    import merlin.models.tf as mm

    config, model = _inttower(prepared, inputs)
    assert _fit_steps(config, model, inputs)["regularization_loss"][0] > 0
    no_cir_config, no_cir = _inttower(prepared, inputs, **{"model.inttower.cir_weight": 0.0})
    assert _fit_steps(no_cir_config, no_cir, inputs)["regularization_loss"][0] == 0.0

    features, _ = next(iter(mm.Loader(inputs.train_dataset, batch_size=32, shuffle=False)))
    keras, fe = model.keras, config.model.inttower
    query, candidate = keras.query_encoder(features).numpy(), keras.candidate_encoder(features).numpy()
    last_layer = query.reshape(len(query), len(fe.fe_layers), fe.user_heads * fe.head_size)[:, -1]
    value = float(keras.contrastive_interaction(tf.constant(query), tf.constant(candidate)))
    assert value == pytest.approx(_numpy_infonce(last_layer, candidate, fe.cir_temperature), rel=1e-4)
    assert value != pytest.approx(
        _numpy_infonce(last_layer, np.roll(candidate, 1, axis=0), fe.cir_temperature), rel=1e-3
    )
    # outside training (a warm start's first call) the model scores each row's own pair by FE
    own_pairs = np.asarray(keras(features, training=False)).reshape(-1)
    np.testing.assert_allclose(own_pairs, np.diag(model.score(query, candidate)), rtol=1e-4, atol=1e-4)


def test_inttower_refuses_settings_it_cannot_build(prepared, inputs):
    with pytest.raises(ValueError, match=r"model.inttower.fe_layers=\[0, 2\]: indices of the 2 tower layers"):
        _inttower(prepared, inputs, **{"model.inttower.fe_layers": [0, 2]})
    with pytest.raises(ValueError, match="user_heads == item_heads"):
        _inttower(prepared, inputs, **{"model.inttower.item_heads": 2})


def test_refresh_items_refuses_inttower_in_one_line(tmp_path):
    from conftest import small_config

    from twotower.lifecycle.refresh import RefreshRefused, refresh_items

    config = small_config(tmp_path, "model.name=inttower")
    with pytest.raises(
        RefreshRefused, match="model.name=inttower indexes item heads; refresh-items adds single item vectors"
    ):
        refresh_items(config, tmp_path / "new_items.parquet")


# ------------------------------------------------------------------ the multi-vector retriever
def _random_heads(
    users: int = 30, items: int = 50, query_heads: int = 6, item_heads: int = 3, size: int = 8, seed: int = 0
):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(users, query_heads, size)).astype(np.float32), rng.normal(
        size=(items, item_heads, size)
    ).astype(np.float32)


def _exact_top_k(query_heads: np.ndarray, item_heads: np.ndarray, seen: sp.csr_matrix, k: int) -> np.ndarray:
    scores = fe_score_matrix(query_heads, item_heads).numpy()
    eval_set = EvalSet(
        user_ids=np.arange(len(query_heads)), relevant=seen, n_relevant=np.ones(len(query_heads)), seen=seen
    )
    return top_k_positions(lambda rows: scores[rows], eval_set, k)


def test_multi_vector_equals_exact_top_k_when_the_depth_covers_every_row():
    query_heads, item_heads = _random_heads()
    seen = sp.random(30, 50, density=0.2, format="csr", random_state=1)
    exact = _exact_top_k(query_heads, item_heads, seen, k=10)
    found = multi_vector_top_k(query_heads, item_heads, k=10, depth=50 * 3, seen=seen)
    np.testing.assert_array_equal(found, exact)
    assert overlap_at_k(found, exact, 10) == 1.0
    for user in range(30):
        assert not set(found[user]) & set(seen[user].indices)  # seen items excluded
    # a shallow search loses some of it, and the overlap says how much
    shallow = multi_vector_top_k(query_heads, item_heads, k=10, depth=1, seen=seen)
    assert overlap_at_k(shallow, exact, 10) < 1.0
    assert not np.array_equal(shallow, exact)


# Two user heads along the axes. Item 0 is the best single match of head 1, item 1 of head 2;
# item 2 matches both fairly well and has the best FE score, 1.5 + 1.5 = 3.0, against 2.2 for item 0.
USER = np.array([[[1.0, 0.0], [0.0, 1.0]]], dtype=np.float32)
ITEMS = np.array(
    [
        [[2.2, 0.0], [-1.0, -1.0]],  # FE 2.2 + 0.0
        [[0.0, 2.0], [-1.0, -1.0]],  # FE 0.0 + 2.0
        [[1.5, 0.0], [0.0, 1.5]],  # FE 1.5 + 1.5: the best
        [[-1.0, -1.0], [-2.0, -2.0]],  # FE -1 - 1
    ],
    dtype=np.float32,
)


def test_union_and_exact_rescoring_find_the_item_no_single_head_ranks_first():
    np.testing.assert_allclose(fe_score_matrix(USER, ITEMS).numpy()[0], [2.2, 2.0, 3.0, -2.0])
    # depth 1: head 1 fetches item 0's row, head 2 item 1's; item 2 is never scored
    assert multi_vector_top_k(USER, ITEMS, k=1, depth=1).tolist() == [[0]]
    # depth 2: head 1 also fetches item 2's first row; re-scored exactly, item 2 wins although
    # its best single-head similarity (1.5) is below item 0's (2.2) and item 1's (2.0)
    assert multi_vector_top_k(USER, ITEMS, k=1, depth=2).tolist() == [[2]]
    assert multi_vector_top_k(USER, ITEMS, k=3, depth=2).tolist() == [[2, 0, 1]]
    # item 2 seen: the next best by FE score, never the seen one
    seen = sp.csr_matrix(np.array([[0, 0, 1, 0]]))
    assert multi_vector_top_k(USER, ITEMS, k=1, depth=2, seen=seen).tolist() == [[0]]
    # items 0 and 2 seen, k=2: depth 1 holds only item 1 unseen, so the search goes deeper
    seen = sp.csr_matrix(np.array([[1, 0, 1, 0]]))
    assert multi_vector_top_k(USER, ITEMS, k=2, depth=1, seen=seen).tolist() == [[1, 3]]


def test_multi_vector_refuses_bad_inputs():
    query_heads, item_heads = _random_heads(users=2, items=5)
    with pytest.raises(ValueError, match="k=6: between 1 and the catalogue's 5 items"):
        multi_vector_top_k(query_heads, item_heads, k=6, depth=4)
    with pytest.raises(ValueError, match="k=0"):
        multi_vector_top_k(query_heads, item_heads, k=0, depth=4)
    with pytest.raises(ValueError, match="query head size 8 differs from item head size 4"):
        multi_vector_top_k(query_heads, item_heads[:, :, :4], k=2, depth=4)
    with pytest.raises(ValueError, match=r"heads are \[rows, heads, size\]"):
        multi_vector_top_k(query_heads.reshape(2, -1), item_heads, k=2, depth=4)
    with pytest.raises(ValueError, match="depth=0"):
        multi_vector_top_k(query_heads, item_heads, k=2, depth=0)
    with pytest.raises(ValueError, match=r"seen is \(2, 4\)"):
        multi_vector_top_k(query_heads, item_heads, k=2, depth=4, seen=sp.csr_matrix((2, 4)))
    layout = HeadLayout(fe_layers=2, user_heads=3, item_heads=3, head_size=8)
    with pytest.raises(ValueError, match="query vectors of width 40; this IntTower's are 6 heads x 8 = 48"):
        layout.query(np.zeros((2, 40), np.float32))
    with pytest.raises(ValueError, match="item vectors of width 48; this IntTower's are 3 heads x 8 = 24"):
        layout.items(np.zeros((2, 48), np.float32))

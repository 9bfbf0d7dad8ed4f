"""model.name=dcn_v2, the ranking model: the cross network and its sampled-negative training
output against NumPy, its whole-catalogue score against its own pair scorer, the saved pair
scorer, and the refusals to index or serve it as a retriever.

Its served cascade is in tests/serving/test_cascade.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import tensorflow as tf
from conftest import registry_model
from merlin.models.tf.outputs.sampling.base import Candidate
from merlin.schema import ColumnSchema, Schema, Tags

from twotower import pipeline
from twotower.config import ConfigError, set_value
from twotower.models import dcn
from twotower.models.dcn import DCNRetrievalModel, PairScorer, SampledPairOutput
from twotower.stages.train import training_batches
from twotower.store.artifacts import ServingSignature

pytestmark = pytest.mark.smoke


def _relu(x):
    return np.maximum(x, 0.0)


def _numpy_pair_score(scorer: PairScorer, query: np.ndarray, items: np.ndarray) -> np.ndarray:
    """DCN-v2 by hand from the layer's weights: x_{l+1} = x_0 * (W_l x_l + b_l) + x_l (W_l = U_l V_l
    at low rank), the ReLU MLP, the logit."""
    x0 = np.concatenate([query, items], axis=1)
    weights = {
        v.name.rsplit(f"{scorer.name}/", 1)[1]: v.numpy() for v in scorer.trainable_variables
    }  # names inside the layer
    x = x0
    for kernel, bias in _cross_layers([v for name, v in weights.items() if "/cross" in name], scorer.low_rank_dim):
        x = x0 * (x @ kernel + bias) + x
    for number in range(len(scorer.layer_sizes)):
        x = _relu(x @ weights[f"layer_{number}/kernel:0"] + weights[f"layer_{number}/bias:0"])
    return (x @ weights["logit/kernel:0"] + weights["logit/bias:0"])[:, 0]


def _cross_layers(cross: list[np.ndarray], low_rank_dim: int):
    """(kernel [width, width], bias) per cross layer, in order. merlin-models creates a full-rank
    layer's kernel and bias; a low-rank one's U [rank, width] with the bias, then V [width, rank]."""
    if not low_rank_dim:
        yield from zip(cross[0::2], cross[1::2])
        return
    for up, bias, down in zip(cross[0::3], cross[1::3], cross[2::3]):
        assert up.shape[0] == down.shape[1] == low_rank_dim
        yield down @ up, bias


def test_pair_scorer_is_the_low_rank_cross_network_and_mlp_by_hand():
    rng = np.random.default_rng(0)
    query, items = rng.normal(size=(7, 5)).astype(np.float32), rng.normal(size=(7, 3)).astype(np.float32)
    scorer = PairScorer(cross_depth=2, low_rank_dim=2, layer_sizes=[4])
    scorer((tf.constant(query), tf.constant(items)))  # creates the variables
    for variable in scorer.trainable_variables:  # away from the zero biases, so every term counts
        variable.assign(rng.normal(scale=0.5, size=variable.shape))
    scores = scorer((tf.constant(query), tf.constant(items))).numpy()
    np.testing.assert_allclose(scores, _numpy_pair_score(scorer, query, items), rtol=1e-4, atol=1e-5)
    # the cross layers multiply user values by item values: how much more a user likes one item than
    # another depends on the user (for a sum of a user part and an item part it would not)
    four = scorer((tf.constant(query[[0, 0, 1, 1]]), tf.constant(items[[0, 1, 0, 1]]))).numpy()
    assert abs((four[0] - four[1]) - (four[2] - four[3])) > 1e-3


def test_training_output_scores_each_positive_and_the_batchs_first_items_masking_its_own():
    rng = np.random.default_rng(1)
    scorer = PairScorer(cross_depth=1, low_rank_dim=0, layer_sizes=[])
    query, items = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
    ids = tf.constant([10, 11, 10, 12, 13])  # rows 0 and 2 share item 10
    item_id = Schema([ColumnSchema("item_id", tags=[Tags.ITEM_ID, Tags.CATEGORICAL], dtype=np.int64)])
    output = SampledPairOutput(
        scorer,
        negatives=3,
        schema=item_id,
        negative_samplers="in-batch",
        false_negative_score=-1e9,
        store_negative_ids=True,
    )
    positive = Candidate(id=ids, metadata={}).with_embedding(tf.constant(items))
    prediction = output.outputs(tf.constant(query), positive, positive)  # in-batch: the negatives are the batch's items
    logits = prediction.outputs.numpy()
    assert logits.shape == (5, 4)
    all_pairs = _numpy_pair_score(scorer, np.repeat(query, 5, axis=0), np.tile(items, (5, 1))).reshape(5, 5)
    np.testing.assert_allclose(logits[:, 0], np.diag(all_pairs), rtol=1e-4, atol=1e-5)
    expected = all_pairs[:, :3].copy()
    expected[
        [0, 0, 1, 2, 2], [0, 2, 1, 0, 2]
    ] = -1e9  # a row's own item (by id: 10 is the batch's items 0 and 2) is no negative
    np.testing.assert_allclose(logits[:, 1:], expected, rtol=1e-4, atol=1e-5)
    assert prediction.negative_candidate_ids.numpy().tolist() == [10, 11, 10]  # what the logQ correction reads
    np.testing.assert_array_equal(prediction.targets.numpy()[:, 0], 1.0)


def _dcn(prepared, inputs, **settings):
    return registry_model(prepared, inputs, "dcn_v2", **settings)


def test_dcn_trains_and_ranks_the_catalogue_by_its_pair_scorer(prepared, inputs, monkeypatch, tmp_path):
    config, model = _dcn(prepared, inputs)
    assert isinstance(model, DCNRetrievalModel)
    users = inputs.valid_users.head(6)
    before = model.query_vectors(users)
    history = model.keras.fit(training_batches(config, inputs.train_dataset).take(3), epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0])
    query, items = model.query_vectors(users), model.item_vectors(inputs.catalogue.features)
    assert not np.allclose(query, before, atol=1e-5)  # the steps trained the embeddings
    embedding_dim = config.train.embedding_dim
    assert query.shape[1] == embedding_dim * len(model.query_schema) and items.shape[1] == embedding_dim * len(
        model.item_schema
    )

    monkeypatch.setattr(dcn, "PAIRS_PER_CALL", 2 * len(items))  # two users per call: the chunks must line up
    matrix = model.score(query, items)
    by_pair = _numpy_pair_score(
        model.scorer, np.repeat(query, len(items), axis=0), np.tile(items, (len(query), 1))
    ).reshape(matrix.shape)
    np.testing.assert_allclose(matrix, by_pair, rtol=1e-4, atol=1e-4)

    model.save_pair_scorer(tmp_path / "pair_scorer", query.shape[1], items.shape[1])
    saved = ServingSignature(tmp_path / "pair_scorer")
    served = saved(query=np.repeat(query[:1], 9, axis=0), items=items[:9])
    np.testing.assert_allclose(served, matrix[0, :9], rtol=1e-5, atol=1e-5)


def test_dcn_refuses_settings_it_has_no_use_for(prepared, inputs):
    with pytest.raises(ValueError, match="model.gating=senet: dcn_v2 has no tower MLP to gate"):
        _dcn(prepared, inputs, **{"model.gating": "senet"})
    with pytest.raises(ValueError, match="train.mixed_negatives=8: dcn_v2 scores the batch's own items"):
        _dcn(prepared, inputs, **{"train.mixed_negatives": 8})
    with pytest.raises(ValueError, match="model.dcn: cross_depth, negatives and batch_size at least 1"):
        _dcn(prepared, inputs, **{"model.dcn.negatives": 0})


def test_dcn_is_refused_as_a_retriever_before_anything_is_written(prepared, tmp_path):
    config = copy.deepcopy(prepared)
    config.output_dir, config.export_dir = tmp_path / "artifacts", tmp_path / "triton_models"
    set_value(config, "model.name", "dcn_v2")
    refusal = (
        r"model.name=dcn_v2 is a ranking model: .* serve it as the pre-ranker behind a retriever "
        r"\(serve.prerank_model=dcn_v2\)"
    )
    with pytest.raises(ConfigError, match=refusal):
        pipeline.run_all(config)
    with pytest.raises(ConfigError, match=refusal):
        pipeline.run_stage("index", config)
    assert not config.output_dir.exists()

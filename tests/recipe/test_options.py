"""Each model option of the two-tower setup, and the EASE baseline, on the small prepared data."""

import dataclasses

import merlin.io
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from merlin.models.tf.inputs.embedding import EmbeddingTable
from merlin.models.tf.transforms.bias import PopularityLogitsCorrection
from merlin.schema import Tags

from twotower.config import ModelConfig
from twotower.models import builder
from twotower.models.base import TrainingStats, encode, share_item_table
from twotower.models.losses import UniformCatalogueSampler, sampling_probabilities
from twotower.stages.baselines import ease_weights, evaluate_ease, evaluate_popularity, tune_ease
from twotower.stages.evaluate import build_eval_set
from twotower.stages.train import item_frequencies, load_training_inputs
from twotower.stages.workflow import category_table, load_workflow

pytestmark = pytest.mark.smoke


@pytest.fixture(scope="module")
def train_data(prepared):
    dataset = merlin.io.Dataset(str(prepared.data_dir / "train_encoded"), engine="parquet")
    vocabulary = category_table(load_workflow(prepared.workflow_dir, "item"), "item_id")
    train = pd.read_parquet(prepared.data_dir / "splits" / "train.parquet")
    return dataset, item_frequencies(dataset.schema, vocabulary, train["item_id"])


@pytest.fixture(scope="module")
def catalogue(prepared):
    return load_training_inputs(prepared).catalogue


def _model(prepared, train_data, catalogue, **options):
    """The default model (two_tower) as merlin-models' Keras model, with ``train`` options changed."""
    dataset, counts = train_data
    stats = TrainingStats(counts, catalogue.features)
    return builder("two_tower")(
        dataset.schema, stats, dataclasses.replace(prepared.train, **options), ModelConfig()
    ).keras


def _layers(block):
    # Keras' own recursive walk (tf.Module.submodules trips over the compiled model's state).
    return list(block._flatten_layers(include_self=False, recursive=True))


def _fit_one_epoch(model, dataset):
    import merlin.models.tf as mm

    history = model.fit(mm.Loader(dataset, batch_size=256, shuffle=True), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize("logq", [True, False])
def test_logq_correction_is_applied_only_when_configured(prepared, train_data, catalogue, logq):
    model = _model(prepared, train_data, catalogue, logq_correction=logq)
    _fit_one_epoch(model, train_data[0])
    corrections = [layer for layer in _layers(model) if isinstance(layer, PopularityLogitsCorrection)]
    assert bool(corrections) == logq


@pytest.mark.parametrize("l2_normalize", [True, False])
def test_l2_normalised_towers(prepared, train_data, catalogue, l2_normalize):
    dataset, _ = train_data
    model = _model(
        prepared, train_data, catalogue, l2_normalize=l2_normalize, temperature=0.07 if l2_normalize else 1.0
    )
    _fit_one_epoch(model, dataset)
    rows = dataset.to_ddf().head(50)
    norms = np.linalg.norm(encode(model.query_encoder, rows, dataset.schema.select_by_tag(Tags.USER)), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-4) == l2_normalize


def test_history_shares_the_item_embedding_table(prepared, train_data, catalogue):
    dataset, _ = train_data
    shared = share_item_table(dataset.schema)
    assert shared["history"].int_domain.name == shared["item_id"].int_domain.name
    model = _model(prepared, train_data, catalogue)
    _fit_one_epoch(model, dataset)
    item_tables = {id(t) for t in _layers(model) if isinstance(t, EmbeddingTable) and t.table_name == "item_id"}
    assert len(item_tables) == 1
    query_tables = {id(t) for t in _layers(model.query_encoder) if isinstance(t, EmbeddingTable)}
    candidate_tables = {id(t) for t in _layers(model.candidate_encoder) if isinstance(t, EmbeddingTable)}
    assert item_tables <= query_tables and item_tables <= candidate_tables


def _first_batch(dataset, batch_size=64):
    import merlin.models.tf as mm

    features, _ = next(iter(mm.Loader(dataset, batch_size=batch_size, shuffle=False)))
    return features


def test_sampling_probabilities_mix_popularity_and_uniform():
    counts = np.array([1.0, 6.0, 2.0, 2.0])  # code 0 reserved, outside the catalogue
    codes = np.array([1, 2, 3])
    assert np.allclose(sampling_probabilities(counts, codes, batch_size=8, mixed_negatives=0), counts / counts.sum())
    mixed = sampling_probabilities(counts, codes, batch_size=8, mixed_negatives=8)
    assert np.isclose(mixed.sum(), 1.0)
    assert np.allclose(mixed, 0.5 * counts / counts.sum() + 0.5 * np.array([0, 1, 1, 1]) / 3)


@pytest.mark.parametrize("mixed_negatives", [0, 48])
def test_mixed_negatives_widen_the_softmax(prepared, train_data, catalogue, mixed_negatives):
    dataset, _ = train_data
    model = _model(prepared, train_data, catalogue, mixed_negatives=mixed_negatives)
    _fit_one_epoch(model, dataset)
    in_batch_only = _model(prepared, train_data, catalogue, mixed_negatives=0)
    _fit_one_epoch(in_batch_only, dataset)
    # The sampler runs the model's own candidate tower: no weights of its own.
    assert len(model.trainable_weights) == len(in_batch_only.trainable_weights)
    logits = model(_first_batch(dataset), training=True).outputs
    assert logits.shape[1] == 1 + 64 + mixed_negatives  # the positive, in-batch, uniform


def test_mixed_negatives_are_catalogue_items_through_the_candidate_tower(prepared, train_data, catalogue):
    from merlin.models.tf.outputs.sampling.base import Candidate

    dataset, _ = train_data
    model = _model(prepared, train_data, catalogue, mixed_negatives=500)
    _fit_one_epoch(model, dataset)
    sampler = next(layer for layer in _layers(model) if isinstance(layer, UniformCatalogueSampler))
    positives = Candidate(id=tf.zeros([4, 1], tf.int64), metadata={})
    sampled = sampler(positives, training=True)
    ids = sampled.id.numpy()[:, 0]
    codes = catalogue.features["item_id"].to_numpy()
    assert ids.shape == (500,) and set(ids) <= set(codes)
    assert len(set(ids)) > len(codes) // 2  # uniform over the catalogue, not the batch
    rows = catalogue.features.set_index("item_id", drop=False).loc[ids]
    expected = encode(model.candidate_encoder, rows, dataset.schema.select_by_tag(Tags.ITEM))
    assert np.allclose(sampled.embedding.numpy(), expected, atol=1e-5)


def test_reference_setup_trains(prepared, train_data, catalogue):
    model = _model(
        prepared, train_data, catalogue, l2_normalize=False, temperature=1.0, logq_correction=False, embedding_dim=None
    )
    _fit_one_epoch(model, train_data[0])


def test_ease_closed_form_and_it_beats_popularity(prepared):
    split = {n: pd.read_parquet(prepared.data_dir / "splits" / f"{n}.parquet") for n in ("train", "valid", "test")}
    catalogue = np.sort(split["train"]["item_id"].unique())
    weights = ease_weights(split["train"], catalogue, 100.0)
    assert weights.shape == (len(catalogue), len(catalogue))
    assert np.all(np.diag(weights) == 0)
    regularisation, tried = tune_ease(
        split["train"], build_eval_set(split["valid"], split["train"], catalogue), catalogue
    )
    assert regularisation in tried
    known = pd.concat([split["train"], split["valid"]])
    test_set = build_eval_set(split["test"], known, catalogue)
    ease = evaluate_ease(ease_weights(known, catalogue, regularisation), test_set)
    assert ease["recall@10"] > evaluate_popularity(split["train"], test_set, catalogue)["recall@10"]

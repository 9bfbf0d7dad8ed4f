"""Each model option of the two-tower setup, and the EASE baseline, on the small prepared data."""

import dataclasses

import merlin.io
import numpy as np
import pandas as pd
import pytest
from merlin.models.tf.inputs.embedding import EmbeddingTable
from merlin.models.tf.transforms.bias import PopularityLogitsCorrection
from merlin.schema import Tags

from twotower.baselines import ease_weights, evaluate_ease, evaluate_popularity, tune_ease
from twotower.evaluate import build_eval_set
from twotower.train import build_model, encode, item_frequencies, share_item_table
from twotower.workflow import category_table, load_workflow

pytestmark = pytest.mark.smoke


@pytest.fixture(scope="module")
def train_data(prepared):
    dataset = merlin.io.Dataset(str(prepared.data_dir / "train_encoded"), engine="parquet")
    vocabulary = category_table(load_workflow(prepared.workflow_dir, "item"), "item_id")
    train = pd.read_parquet(prepared.data_dir / "splits" / "train.parquet")
    return dataset, item_frequencies(dataset.schema, vocabulary, train["item_id"])


def _model(prepared, train_data, **options):
    dataset, counts = train_data
    return build_model(dataset.schema, counts, dataclasses.replace(prepared.train, **options))


def _layers(block):
    # Keras' own recursive walk (tf.Module.submodules trips over the compiled model's state).
    return list(block._flatten_layers(include_self=False, recursive=True))


def _fit_one_epoch(model, dataset):
    import merlin.models.tf as mm

    history = model.fit(mm.Loader(dataset, batch_size=256, shuffle=True), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize("logq", [True, False])
def test_logq_correction_is_applied_only_when_configured(prepared, train_data, logq):
    model = _model(prepared, train_data, logq_correction=logq)
    _fit_one_epoch(model, train_data[0])
    corrections = [layer for layer in _layers(model) if isinstance(layer, PopularityLogitsCorrection)]
    assert bool(corrections) == logq


@pytest.mark.parametrize("l2_normalize", [True, False])
def test_l2_normalised_towers(prepared, train_data, l2_normalize):
    dataset, _ = train_data
    model = _model(prepared, train_data, l2_normalize=l2_normalize, temperature=0.07 if l2_normalize else 1.0)
    _fit_one_epoch(model, dataset)
    rows = dataset.to_ddf().head(50)
    norms = np.linalg.norm(encode(model.query_encoder, rows, dataset.schema.select_by_tag(Tags.USER)), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-4) == l2_normalize


def test_history_shares_the_item_embedding_table(prepared, train_data):
    dataset, _ = train_data
    shared = share_item_table(dataset.schema)
    assert shared["history"].int_domain.name == shared["item_id"].int_domain.name
    model = _model(prepared, train_data)
    _fit_one_epoch(model, dataset)
    item_tables = {id(t) for t in _layers(model) if isinstance(t, EmbeddingTable) and t.table_name == "item_id"}
    assert len(item_tables) == 1
    query_tables = {id(t) for t in _layers(model.query_encoder) if isinstance(t, EmbeddingTable)}
    candidate_tables = {id(t) for t in _layers(model.candidate_encoder) if isinstance(t, EmbeddingTable)}
    assert item_tables <= query_tables and item_tables <= candidate_tables


def test_reference_setup_trains(prepared, train_data):
    model = _model(prepared, train_data, l2_normalize=False, temperature=1.0, logq_correction=False, embedding_dim=None)
    _fit_one_epoch(model, train_data[0])


def test_ease_closed_form_and_it_beats_popularity(prepared):
    split = {n: pd.read_parquet(prepared.data_dir / "splits" / f"{n}.parquet") for n in ("train", "valid", "test")}
    catalogue = np.sort(split["train"]["item_id"].unique())
    weights = ease_weights(split["train"], catalogue, 100.0)
    assert weights.shape == (len(catalogue), len(catalogue))
    assert np.all(np.diag(weights) == 0)
    regularisation, tried = tune_ease(split["train"], build_eval_set(split["valid"], split["train"], catalogue), catalogue)
    assert regularisation in tried
    known = pd.concat([split["train"], split["valid"]])
    test_set = build_eval_set(split["test"], known, catalogue)
    ease = evaluate_ease(ease_weights(known, catalogue, regularisation), test_set)
    assert ease["recall@10"] > evaluate_popularity(split["train"], test_set, catalogue)["recall@10"]

import json

import numpy as np
import pytest

from twotower.store.artifacts import load_item_vectors
from twotower.store.index import load_index

pytestmark = pytest.mark.smoke


def test_training_reduces_loss_and_beats_popularity(exported):
    metrics = json.loads(exported.metrics_path.read_text())
    losses = [epoch["loss"] for epoch in metrics["history"]]
    assert losses[-1] < losses[0]
    model, popularity = metrics["test"][exported.model.name], metrics["test"]["popularity"]
    for name, value in model.items():
        assert 0.0 <= value <= 1.0, name
    assert model["recall@10"] > popularity["recall@10"]
    assert model["recall@10"] <= model["recall@20"] <= model["recall@100"]
    assert (exported.output_dir / "training_curves.png").stat().st_size > 0


def test_index_covers_the_catalogue(exported):
    item_ids, vectors = load_item_vectors(exported.item_vectors_path)
    index = load_index(exported.index_path)
    assert index.ntotal == len(item_ids) == len(np.unique(item_ids))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)  # L2-normalised tower


def test_served_path_gives_the_training_side_metrics(exported):
    from twotower.stages.evaluate import serving_side_metrics

    training_side = json.loads(exported.metrics_path.read_text())["test"][exported.model.name]
    served = serving_side_metrics(exported)
    assert served == pytest.approx(training_side, abs=1e-3)


def test_saved_towers_reload_without_retraining(exported):
    from twotower.stages.evaluate import saved_query_vectors
    from twotower.stages.workflow import encoded_catalogue, load_saved_workflows
    from twotower.store.artifacts import ServingSignature, call_signature, load_recipe_data

    data = load_recipe_data(exported.data_dir)
    catalogue = encoded_catalogue(load_saved_workflows(exported.workflow_dir), data.items)
    item_ids, vectors = load_item_vectors(exported.item_vectors_path)
    reloaded = call_signature(ServingSignature(exported.candidate_tower_dir), catalogue.features)
    np.testing.assert_array_equal(item_ids, catalogue.item_ids)
    np.testing.assert_allclose(reloaded, vectors, atol=1e-5)

    users = data.users["user_id"].head(3).to_numpy()
    query = saved_query_vectors(exported, users)
    assert query.shape == (3, vectors.shape[1])
    assert np.allclose(np.linalg.norm(query, axis=1), 1.0, atol=1e-4)


def test_a_frozen_tower_answers_as_the_saved_one_without_reading_variables(exported):
    """Serving freezes a tower's signature (weights as constants); one larger than the limit keeps its
    variables. Both must answer alike, and only the frozen one runs without variable reads."""
    from twotower.stages.workflow import encoded_catalogue, load_saved_workflows
    from twotower.store.artifacts import FREEZE_MAX_BYTES, ServingSignature, call_signature, load_recipe_data

    data = load_recipe_data(exported.data_dir)
    catalogue = encoded_catalogue(load_saved_workflows(exported.workflow_dir), data.items)
    frozen = ServingSignature(exported.candidate_tower_dir, FREEZE_MAX_BYTES)
    with_variables = ServingSignature(exported.candidate_tower_dir, freeze_max_bytes=1)  # above any tower's size
    assert frozen.frozen and not with_variables.frozen
    op_types = [{op.type for op in tower._session.graph.get_operations()} for tower in (frozen, with_variables)]
    assert "VarHandleOp" not in op_types[0] and "VarHandleOp" in op_types[1]
    assert frozen.input_dtypes == with_variables.input_dtypes and frozen.output_dim == with_variables.output_dim
    np.testing.assert_allclose(
        call_signature(frozen, catalogue.features), call_signature(with_variables, catalogue.features), atol=1e-6
    )

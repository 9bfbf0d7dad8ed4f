"""IntTower served by a real Triton server: as the retriever of its own run (multi-vector FAISS
over item heads) and, with the ranking model DCN-v2, as the pre-ranking stage after the two-tower
index (the cascade).

One IntTower and one DCN-v2 are trained, by ``twotower prerank``, on copies of the session's
exported two-tower run; the IntTower run folder is then indexed and exported as a retriever too.
Expected answers are computed here apart from the served pair scorer: IntTower's from the saved
towers with the TensorFlow FE score (``fe_score_matrix``; the retriever's NumPy one is the
serving code's), DCN-v2's from its saved weights reloaded into the Keras model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from twotower import pipeline
from twotower.config import ConfigError, prerank_config, set_value
from twotower.models import head_shape
from twotower.models.inttower import fe_score_matrix
from twotower.serving.client import recommend, user_id_request
from twotower.serving.export import load_exported_ensemble, recommend_in_process
from twotower.serving.triton import TritonServer
from twotower.stages.evaluate import saved_query_vectors
from twotower.store.artifacts import load_item_vectors
from twotower.store.index import ItemIndex, load_index
from twotower.store.manifest import ArtifactMismatch

pytestmark = pytest.mark.integration
TOP_K, CANDIDATES = 5, 20


def _cascade(exported, root, prerank_model: str):
    """A copy of the exported two-tower run with a ``prerank_model`` pre-ranker trained by `twotower
    prerank`, exported as the cascade: the two-tower index retrieves 20 candidates, the pre-ranker keeps 5."""
    config = copy.deepcopy(exported)
    config.output_dir, config.export_dir = root / "artifacts", root / "triton_models"
    shutil.copytree(exported.output_dir, config.output_dir)
    set_value(config, "train.epochs", 2)  # the pre-ranker's training only: the retriever is the session's
    set_value(config, "serve.prerank_model", prerank_model)
    pipeline.run_prerank(config)
    set_value(config, "serve.prerank_candidates", CANDIDATES)
    pipeline.run_export(config)
    return config


@pytest.fixture(scope="module")
def cascade(exported, tmp_path_factory):
    """IntTower pre-ranking (the default serve.prerank_model)."""
    return _cascade(exported, tmp_path_factory.mktemp("cascade"), "inttower")


@pytest.fixture(scope="module")
def dcn_cascade(exported, tmp_path_factory):
    """The ranking model DCN-v2 pre-ranking."""
    return _cascade(exported, tmp_path_factory.mktemp("dcn_cascade"), "dcn_v2")


CASCADES = ["cascade", "dcn_cascade"]


@pytest.fixture(scope="module")
def ranker(cascade):
    """The pre-ranker's run folder, indexed and exported as an IntTower retriever that searches
    every item head (its answers must then be the exact FE top k)."""
    config = prerank_config(cascade)
    set_value(config, "model.inttower.search_depth", 100_000)
    config.export_dir = config.output_dir / "triton_models"
    for stage in ("index", "features", "export"):
        pipeline.run_stage(stage, config)
    return config


def _server(config):
    serve = dataclasses.replace(config.serve, grpc_port=0, http_port=0, metrics_port=0)
    return TritonServer(config.export_dir, config.output_dir / "triton", serve)


def _known_users(config, count=12) -> np.ndarray:
    return pd.read_parquet(config.splits_dir / "test.parquet")["user_id"].drop_duplicates().head(count).to_numpy()


def _seen(config, users) -> list[np.ndarray]:
    known = pd.concat([pd.read_parquet(config.splits_dir / f"{name}.parquet") for name in ("train", "valid")])
    return [known.loc[known.user_id == user, "item_id"].unique() for user in users]


def _fe_scores(config, users, item_vectors) -> np.ndarray:
    """[users, items] FE scores from the run's saved towers, by TensorFlow."""
    shape = head_shape(config.model)
    return fe_score_matrix(shape.query(saved_query_vectors(config, users)), shape.items(item_vectors)).numpy()


def _reloaded_scores(config, users, item_vectors) -> np.ndarray:
    """[users, items] scores of a run's model rebuilt from its saved weights (``model.score``, in
    Keras): not the SavedModel pair scorer the server runs."""
    from twotower.stages.train import build_model, load_training_inputs, training_batches

    inputs = load_training_inputs(config)
    model = build_model(config, inputs)
    first = next(iter(training_batches(config, inputs.train_dataset)))
    model.load_weights(config.model_weights_path, first[0] if isinstance(first, tuple) else first)
    return model.score(saved_query_vectors(config, users), item_vectors)


@pytest.mark.parametrize("cascade_fixture", CASCADES)
def test_cascade_answers_the_pre_rankers_best_of_the_retrieved_candidates(cascade_fixture, request):
    cascade = request.getfixturevalue(cascade_fixture)
    users = _known_users(cascade)
    seen = _seen(cascade, users)
    candidates, _ = ItemIndex(load_index(cascade.index_path)).search(
        saved_query_vectors(cascade, users), CANDIDATES, seen
    )
    ranker = prerank_config(cascade)
    ranker_ids, ranker_vectors = load_item_vectors(ranker.item_vectors_path)
    scores = (_fe_scores if head_shape(ranker.model) else _reloaded_scores)(ranker, users, ranker_vectors)
    position = pd.Index(ranker_ids)
    with _server(cascade) as server:
        answer = recommend(users, server.grpc_url)
    assert not answer["is_fallback"].any()
    assert answer["item_ids"].shape == answer["scores"].shape == (len(users), TOP_K)
    reordered = 0
    for row, user_candidates in enumerate(candidates):
        candidate_scores = scores[row, position.get_indexer(user_candidates)]
        best = np.argsort(-candidate_scores, kind="stable")[:TOP_K]
        np.testing.assert_array_equal(answer["item_ids"][row], user_candidates[best])
        np.testing.assert_allclose(answer["scores"][row], candidate_scores[best], rtol=1e-4, atol=1e-4)
        assert not set(answer["item_ids"][row]) & set(seen[row])
        reordered += not np.array_equal(answer["item_ids"][row], user_candidates[:TOP_K])
    assert reordered  # the pre-ranker changed some user's top k: the second stage is not a pass-through


@pytest.mark.parametrize("cascade_fixture", CASCADES)
def test_served_cascade_equals_the_in_process_graph_and_keeps_the_contract(cascade_fixture, request):
    cascade = request.getfixturevalue(cascade_fixture)
    users = _known_users(cascade, 6)
    requested = np.array([users[0], -7, *users[1:]])
    expected = recommend_in_process(load_exported_ensemble(cascade.export_dir), requested)
    with _server(cascade) as server:
        answer = recommend(requested, server.grpc_url)
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            too_many = user_id_request(np.zeros(cascade.serve.max_request_users + 1, dtype=np.int64))
            with pytest.raises(InferenceServerException) as raised:
                client.infer(cascade.serve.model_name, [too_many], client_timeout=30)
        assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert raised.value.message().endswith(
            f"batch-size must be <= {cascade.serve.max_request_users} for 'executor_model'"
        )
        assert recommend(users[:1], server.grpc_url)["item_ids"].shape == (1, TOP_K)  # still serving
    np.testing.assert_array_equal(answer["item_ids"], expected["item_ids"])
    np.testing.assert_allclose(answer["scores"], expected["scores"], rtol=1e-5, atol=1e-6)
    assert answer["is_fallback"].tolist() == [False, True, *[False] * (len(users) - 1)]
    counts = pd.read_parquet(cascade.splits_dir / "train.parquet")["item_id"].value_counts()
    assert counts[answer["item_ids"][1][0]] == counts.iloc[0]  # an unknown user: the most popular items
    assert (np.diff(answer["scores"][1]) <= 0).all()


def test_inttower_served_as_a_retriever_is_the_exact_fe_top_k(ranker):
    users = _known_users(ranker)
    seen = _seen(ranker, users)
    item_ids, item_vectors = load_item_vectors(ranker.item_vectors_path)
    scores = _fe_scores(ranker, users, item_vectors)
    with _server(ranker) as server:
        answer = recommend(users, server.grpc_url)
    expected = recommend_in_process(load_exported_ensemble(ranker.export_dir), users)
    np.testing.assert_array_equal(answer["item_ids"], expected["item_ids"])
    for row in range(len(users)):
        scores[row, np.isin(item_ids, seen[row])] = -np.inf
        best = np.argsort(-scores[row], kind="stable")[:TOP_K]
        np.testing.assert_array_equal(answer["item_ids"][row], item_ids[best])
        np.testing.assert_allclose(answer["scores"][row], scores[row, best], rtol=1e-4, atol=1e-4)
    record = json.loads(ranker.manifest_path.read_text())["index"]["details"]["index"]
    assert record["kind"] == "multi_vector" and record["overlap@100"] == 1.0  # every row searched: exact


def test_export_refuses_a_pre_ranker_that_does_not_match_the_run(cascade, tmp_path):
    def export(**settings):
        config = copy.deepcopy(cascade)
        config.export_dir = tmp_path / "refused"
        for key, value in settings.items():
            set_value(config, key, value)
        return pipeline.run_export(config)

    with pytest.raises(ConfigError, match=r"serve.prerank_candidates=3: at least serve.top_k=5"):
        export(**{"serve.prerank_candidates": 3})
    with pytest.raises(ArtifactMismatch, match="no pre-ranker trained in .*: run `twotower prerank`"):
        export(**{"serve.prerank_run": str(tmp_path / "nowhere")})
    with pytest.raises(ArtifactMismatch, match="trained with other model.\\* settings"):
        export(**{"model.inttower.head_size": 16})  # the pre-ranker's settings are this configuration's
    with pytest.raises(ArtifactMismatch, match="trained with other model.\\* settings"):
        export(**{"serve.prerank_model": "two_tower"})

    other = tmp_path / "other"
    shutil.copytree(cascade.prerank_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["train"]["consumed"]["workflow"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactMismatch, match="trained on another workflow than this run's"):
        export(**{"serve.prerank_run": str(other)})

    shutil.rmtree(other)
    shutil.copytree(cascade.prerank_dir, other)
    with np.load(other / "model" / "item_vectors.npz") as saved:
        ids, vectors = saved["item_ids"], saved["vectors"]
    np.savez(other / "model" / "item_vectors.npz", item_ids=ids[1:], vectors=vectors[1:])
    with pytest.raises(
        ArtifactMismatch, match=rf"1 items of this run's catalogue \(e.g. {ids[0]}\) are not in the pre-ranker's"
    ):
        export(**{"serve.prerank_run": str(other)})
    shutil.rmtree(other)
    shutil.copytree(cascade.prerank_dir, other)
    shutil.rmtree(other / "model" / "pair_scorer")  # a pre-ranker trained before pair scorers were saved
    with pytest.raises(
        ArtifactMismatch, match=r"the pre-ranker in .* has no pair_scorer .*; run `twotower prerank` again"
    ):
        export(**{"serve.prerank_run": str(other)})
    assert not (tmp_path / "refused").exists()  # nothing written by any refused export

    elsewhere = copy.deepcopy(cascade)
    set_value(elsewhere, "serve.prerank_run", str(other))
    with pytest.raises(ConfigError, match="trains into <output_dir>/prerank only"):
        pipeline.run_prerank(elsewhere)  # it would replace a folder it did not make

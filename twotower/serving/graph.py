"""Stage 6: the merlin-systems serving graph over a run's artifacts (exported by ``export.py``).

The recipe's graph:

    user_id -> OnlineQueryFeatures (Feast online store: features already encoded by
               the saved NVTabular user workflow, plus the user's seen items)
            -> PredictQueryTower (SavedModel) -> RetrieveTopK (FAISS, seen items
               excluded, most-popular fallback for unknown users)
            -> [PrerankCandidates: with serve.prerank_candidates, retrieval fetches that many
                and a pre-ranker (another run's model, IntTower by default, or the ranking
                model DCN-v2) keeps the best top_k]
            -> item_ids, scores, is_fallback

A multi-vector retriever (``model.name=inttower``) searches with ``RetrieveByHeads`` in place of
``RetrieveTopK``.

The reference graph the serving benchmark compares against (the public NVIDIA example's)
lives beside that benchmark, in ``twotower/benchmarks/support/reference_graph.py``.

Every operator (``ops/``) runs inside Merlin's python-backend executor model, so the export
loads on a Triton server without the TensorFlow backend (the one PyPI ships).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import merlin.dtypes as md
import numpy as np
from merlin.schema import ColumnSchema, Schema
from merlin.systems.dag import Ensemble

from twotower.config import prerank_config
from twotower.models import check_retriever, head_shape
from twotower.models.multi_vector import HeadShape
from twotower.serving.ops.features import OnlineQueryFeatures
from twotower.serving.ops.prerank import PrerankCandidates
from twotower.serving.ops.query_tower import PredictQueryTower
from twotower.serving.ops.retrieval import RetrieveByHeads, RetrieveTopK
from twotower.store.artifacts import (
    EXTERNAL_ID,
    RAGGED_SEPARATOR,
    has_text_ids,
    load_item_vectors,
    load_recipe_data,
    load_split,
)
from twotower.store.manifest import fingerprint

if TYPE_CHECKING:
    from twotower.config import RecipeConfig


class MultiVector(NamedTuple):
    """The retriever is a multi-vector model: how its vectors split into heads, and the rows each
    user head fetches (``model.inttower.search_depth``)."""

    shape: HeadShape
    depth: int


class Prerank(NamedTuple):
    """The cascade's pre-ranking stage: the pre-ranker run's model folder and how many candidates
    retrieval hands it."""

    model_dir: Path
    candidates: int


def _union(*schemas: Schema) -> Schema:
    columns: dict[str, ColumnSchema] = {}
    for schema in schemas:
        for column in schema:
            columns.setdefault(column.name, column)
    return Schema(list(columns.values()))


def build_ensemble(
    feature_repo: Path,
    events_dir: Path,
    query_tower_dir: Path,
    index_path: Path,
    top_k: int,
    fallback: tuple[np.ndarray, np.ndarray],
    exclude_seen: bool,
    max_users: int,
    workflow_fingerprint: str,
    external_ids: ExternalIds | None = None,
    multi_vector: MultiVector | None = None,
    prerank: Prerank | None = None,
) -> Ensemble:
    """The recipe's serving graph; ``workflow_fingerprint`` is the workflow the query tower was
    trained on, which the online store's features must come from; ``events_dir``: the run's live
    events (``twotower.store.events``), folded into the users' rows. ``external_ids`` maps text ids
    of the data files to the recipe's int ids and back. With ``prerank``, retrieval fetches
    ``prerank.candidates`` items (and as many fallback items) and the pre-ranker keeps ``top_k``."""
    external_ids = external_ids or ExternalIds()
    prerank_inputs = _signature_schema(PredictQueryTower(prerank.model_dir / "query_tower")) if prerank else Schema()
    model_inputs = _union(_signature_schema(PredictQueryTower(query_tower_dir)), prerank_inputs)
    lookup = OnlineQueryFeatures(
        feature_repo,
        events_dir,
        model_inputs,
        max_users,
        workflow_fingerprint,
        external_ids.user_codes,
        external_ids.item_codes,
    )
    retrieval_inputs = lookup.compute_output_schema(Schema(), None).select_by_name(["seen_items", "known"])
    retrieved = prerank.candidates if prerank else top_k
    retrieval_names = None if prerank else external_ids.item_names  # the pre-ranker reads int ids and names them
    retrieval_args = (retrieved, *fallback)
    retrieval_kwargs = {"exclude_seen": exclude_seen, "item_names": retrieval_names, "passthrough": prerank_inputs}
    retrieve = (
        RetrieveByHeads(index_path, multi_vector.shape, multi_vector.depth, *retrieval_args, **retrieval_kwargs)
        if multi_vector
        else RetrieveTopK(index_path, *retrieval_args, **retrieval_kwargs)
    )
    graph = (
        ["user_id"]
        >> lookup
        >> PredictQueryTower(query_tower_dir, passthrough=_union(retrieval_inputs, prerank_inputs))
        >> retrieve
    )
    if prerank:
        graph = graph >> PrerankCandidates(prerank.model_dir, min(top_k, retrieve.top_k), external_ids.item_names)
    return Ensemble(
        graph, Schema([ColumnSchema("user_id", dtype=np.int64 if external_ids.user_codes is None else md.string)])
    )


class ExternalIds(NamedTuple):
    """Text ids of the data files (twotower/stages/data.py gives the recipe int ids for them); None
    where the files' ids are integers and the recipe uses them as they are."""

    user_codes: dict[str, int] | None = None  # text user id -> int id
    item_names: np.ndarray | None = None  # int item id -> text item id (object array of UTF-8 bytes)

    @property
    def item_codes(self) -> dict[str, int] | None:
        """Text item id -> int id."""
        if self.item_names is None:
            return None
        return {name.decode(): item for item, name in enumerate(self.item_names) if name}


def load_external_ids(config: RecipeConfig) -> ExternalIds:
    """The run's text ids, from the tables the data stage wrote."""

    data = load_recipe_data(config.data_dir)
    user_codes = None
    if has_text_ids(data.users[EXTERNAL_ID]):
        user_codes = dict(zip(data.users[EXTERNAL_ID], data.users["user_id"].astype(int)))
    item_names = None
    if has_text_ids(data.items[EXTERNAL_ID]):
        # bytes, as Triton's python backend sends text (BYTES) and as gRPC clients receive it
        item_names = np.full(int(data.items["item_id"].max()) + 1, b"", dtype=object)
        item_names[data.items["item_id"].to_numpy()] = [name.encode() for name in data.items[EXTERNAL_ID]]
    return ExternalIds(user_codes, item_names)


def _signature_schema(tower: PredictQueryTower) -> Schema:
    """The query tower's inputs as Merlin columns (``x__values``/``x__offsets`` are one ragged ``x``)."""
    dtypes = tower.resource.input_dtypes
    columns: dict[str, ColumnSchema] = {}
    for name, dtype in dtypes.items():
        column, _, part = name.partition(RAGGED_SEPARATOR)
        if part != "offsets":  # a list column's dtype is its values'
            columns[column] = ColumnSchema(column, dtype=dtype, dims=(None, None) if part else None)
    return Schema([columns[name] for name in dict.fromkeys(n.partition(RAGGED_SEPARATOR)[0] for n in dtypes)])


def popular_items(config: RecipeConfig, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cold-start answer: the ``count`` (default ``serve.top_k``) catalogue items with most training
    positives, scores as a share of the top item's."""

    catalogue, _ = load_item_vectors(config.item_vectors_path)
    counts = load_split(config.splits_dir).train["item_id"].value_counts()
    counts = counts[counts.index.isin(catalogue)].head(count or config.serve.top_k)
    return counts.index.to_numpy(dtype=np.int64), (counts / counts.iloc[0]).to_numpy(dtype=np.float32)


def recipe_ensemble(config: RecipeConfig, feature_repo: Path | None = None) -> Ensemble:
    """The serving graph over this run's artifacts (``feature_repo`` defaults to the run's): the
    retriever's own (multi-vector for a model with heads), then the pre-ranker of
    ``serve.prerank_run`` when ``serve.prerank_candidates`` is set."""

    check_retriever(config.model)
    shape = head_shape(config.model)
    multi_vector = MultiVector(shape, config.model.inttower.search_depth) if shape else None
    prerank = None
    if config.serve.prerank_candidates:
        ranker = prerank_config(config)
        prerank = Prerank(ranker.model_dir, config.serve.prerank_candidates)
    return build_ensemble(
        feature_repo or config.feature_repo_dir,
        config.events_dir,
        config.query_tower_dir,
        config.index_path,
        config.serve.top_k,
        popular_items(config, prerank.candidates if prerank else None),
        exclude_seen=config.serve.exclude_seen,
        max_users=config.serve.max_request_users,
        workflow_fingerprint=fingerprint(config.workflow_dir),
        external_ids=load_external_ids(config),
        multi_vector=multi_vector,
        prerank=prerank,
    )

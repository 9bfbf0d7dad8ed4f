"""Stage 6: the merlin-systems serving graphs and their Triton export.

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
lives beside that benchmark, in ``twotower/reference_graph.py``.

Every operator runs inside Merlin's python-backend executor model, so the export
loads on a Triton server without the TensorFlow backend (the one PyPI ships).
Operators copy what they need into the executor's artifact folder and keep no
absolute path in the pickled graph, so the exported repository can move.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd
import merlin.dtypes as md
from merlin.dag import BaseOperator, ColumnSelector, postorder_iter_nodes
from merlin.schema import ColumnSchema, Schema
from merlin.systems.dag import Ensemble
from merlin.table import TensorColumn, TensorTable

from twotower.errors import RequestError, ServiceUnavailable
from twotower.index import ItemIndex, load_index
from twotower.manifest import atomic_dir, staging_dir
from twotower.multi_vector import HeadIndex, HeadShape

if TYPE_CHECKING:
    from twotower.config import RecipeConfig

log = logging.getLogger(__name__)

FEATURE_REPO_ENV = "TWOTOWER_FEATURE_REPO"  # overrides where the executor finds Feast
SERVED_FEATURE_REPO = "feature_repo"  # each exported version's copy of the run's Feast repository
MODEL_NAME = "executor_model"
RAGGED_SEPARATOR = "__"
UNKNOWN_CODE = -1  # never a user id of the recipe (they are the files' integers or 1..N)


def _as_frame(transformable) -> pd.DataFrame:
    return transformable.to_df() if isinstance(transformable, TensorTable) else transformable


def _user_ids(transformable, max_users: int) -> np.ndarray:
    """The request's user ids, rejecting an empty or oversized batch."""
    user_ids = np.asarray(transformable["user_id"].values if isinstance(transformable, TensorTable) else transformable["user_id"]).reshape(-1)
    if len(user_ids) == 0:
        raise RequestError("empty request: 'user_id' has no rows")
    if len(user_ids) > max_users:
        raise RequestError(f"request has {len(user_ids)} users; the maximum is {max_users} (serve.max_request_users)")
    return user_ids


def _text(value) -> str:
    """A text id as Triton delivers it (bytes) or as Python callers pass it (str)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _ragged(lists: list[list[int]]) -> TensorColumn:
    offsets = np.concatenate([[0], np.cumsum([len(v) for v in lists])]).astype(np.int32)
    return TensorColumn(np.fromiter((x for v in lists for x in v), dtype=np.int64, count=offsets[-1]), offsets=offsets)


def read_online(reader, ids: np.ndarray) -> list:
    """``reader.read(ids)``; an online store that cannot be reached is ServiceUnavailable (a
    one-line UNAVAILABLE to the client), not an internal fault."""
    import redis.exceptions

    try:
        return reader.read(ids)
    except (ConnectionError, TimeoutError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ServiceUnavailable(f"online feature store unavailable: {reason}") from error


class _ArtifactOperator(BaseOperator):
    """An operator backed by one file or folder, copied into the export on save.

    In process it reads ``source``; after export it reads the copy named
    ``artifact_name`` inside the executor's artifact folder.
    """

    artifact_name = ""

    def __init__(self, source: Path):
        super().__init__()
        self.source = str(source)
        self._resource = None

    def _load(self, path: Path):
        raise NotImplementedError

    @property
    def resource(self):
        if self._resource is None:
            self._resource = self._load(Path(self.source))
        return self._resource

    def save_artifacts(self, artifact_path: str) -> None:
        target = Path(artifact_path) / self.artifact_name
        if Path(self.source).is_dir():
            shutil.copytree(self.source, target, dirs_exist_ok=True)
        else:
            shutil.copy2(self.source, target)

    def load_artifacts(self, artifact_path: str) -> None:
        # Merlin's Graph calls this with "" while building, meaning "load in place".
        if artifact_path:
            self.source = str(Path(artifact_path) / self.artifact_name)
        self._resource = self._load(Path(self.source))

    def __getstate__(self) -> dict:
        # The export folder supplies the path again on load.
        return {**self.__dict__, "source": None, "_resource": None}


def load_serving_signature(path: Path):
    """A saved tower's ``serving_default`` signature: plain TensorFlow, no Keras or Merlin
    objects, so the executor does not import merlin.models to run it."""
    import tensorflow as tf

    _single_threaded_tensorflow()
    return tf.saved_model.load(str(path)).signatures["serving_default"]


def call_signature(signature, features: TensorTable | pd.DataFrame) -> np.ndarray:
    """Run a serving signature on encoded feature columns, feeding only its inputs
    (calling it with extra columns fails to match a concrete function)."""
    import tensorflow as tf

    table = features if isinstance(features, TensorTable) else TensorTable.from_df(features.reset_index(drop=True))
    _, specs = signature.structured_input_signature
    inputs = {}
    for name, spec in specs.items():
        # merlin-models' signature takes list features as <name>__values / <name>__offsets.
        column, _, part = name.partition(RAGGED_SEPARATOR)
        data = table[column]
        array = {"values": data.values, "offsets": data.offsets, "": data.values}[part]
        inputs[name] = tf.constant(np.asarray(array).reshape(-1), dtype=spec.dtype)
    (vectors,) = signature(**inputs).values()
    return vectors.numpy()


class _FeatureRepoOperator(BaseOperator):
    """An operator that reads the run's Feast repository.

    The export copies the repository into the version it writes (``feature_store.served_copy``,
    ``<model>/<version>/feature_repo``), and the version reads its copy: a retrain or refresh
    that changes the run's rows changes what is served only with the version built on them.
    The TWOTOWER_FEATURE_REPO environment variable names another repository instead (every
    version then reads that one).
    """

    def __init__(self, feature_repo: Path):
        super().__init__()
        self.feature_repo = str(Path(feature_repo).resolve())
        self._repo_from_artifacts: str | None = None
        self._client = None

    def _connect(self, repo: Path):
        raise NotImplementedError

    @property
    def client(self):
        if self._client is None:
            self._client = self._connect(Path(self.feature_repo))
        return self._client

    def save_artifacts(self, artifact_path: str) -> None:
        from twotower.feature_store import served_copy

        # the version's own copy, beside its ensemble/ (the first operator of the graph makes it)
        served = Path(artifact_path).parent / SERVED_FEATURE_REPO
        if not served.exists():
            served_copy(Path(self.feature_repo), served)
        self._repo_from_artifacts = os.path.relpath(served, artifact_path)

    def load_artifacts(self, artifact_path: str) -> None:
        override = os.environ.get(FEATURE_REPO_ENV)
        if override:
            repo = Path(override)
        elif artifact_path:
            repo = Path(artifact_path) / self._repo_from_artifacts
        else:  # while building the graph in process
            repo = Path(self.feature_repo)
        if not (repo / "feature_store.yaml").exists():
            raise FileNotFoundError(f"no Feast repository at {repo.resolve()}; set {FEATURE_REPO_ENV}")
        self.feature_repo = str(repo.resolve())
        self._client = self._connect(repo)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "feature_repo": None, "_client": None}


class OnlineQueryFeatures(_FeatureRepoOperator):
    """Encoded query features and seen items for a batch of dataset user ids.

    Unknown users get pad codes, no seen items and ``known = False``: the
    retrieval step answers them with the fallback list.

    On connecting (at load) it refuses an online store materialized from another
    workflow than ``workflow_fingerprint``, the one the query tower was trained on:
    its codes would mean other values.
    """

    def __init__(
        self, feature_repo: Path, model_inputs: Schema, max_users: int, workflow_fingerprint: str, user_codes: dict[str, int] | None = None
    ):
        super().__init__(feature_repo)
        self.model_inputs = model_inputs
        self.max_users = max_users
        self.workflow_fingerprint = workflow_fingerprint
        self.user_codes = user_codes  # text user ids -> the recipe's int ids; None: requests carry the int ids

    def _connect(self, repo: Path):
        from twotower.feature_store import QUERY_VIEW, USER_VIEW, OnlineReader, check_materialized_from

        # One store for both views: the check opens its online-store connection and every
        # request reads through it, so requests read the store that was checked (a SQLite file
        # replaced by a later 'features' run is only picked up when the model reloads).
        query = OnlineReader(repo, QUERY_VIEW)
        check_materialized_from(query.store, self.workflow_fingerprint)
        return query, OnlineReader(query.store, USER_VIEW)

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema: Schema = None) -> Schema:
        return self.model_inputs + Schema(
            [
                ColumnSchema("seen_items", dtype=np.int64, dims=(None, None)),
                ColumnSchema("known", dtype=md.boolean),
            ]
        )

    def transform(self, col_selector: ColumnSelector, transformable):
        from twotower.feature_store import ENCODED_PREFIX

        user_ids = _user_ids(transformable, self.max_users)
        if self.user_codes is not None:  # an id the data never had is an unknown user, like an unknown int id
            user_ids = np.array([self.user_codes.get(_text(u), UNKNOWN_CODE) for u in user_ids], dtype=np.int64)
        query_reader, user_reader = self.client
        encoded = read_online(query_reader, user_ids)
        raw = read_online(user_reader, user_ids)
        known = np.array([row is not None for row in encoded])
        columns = {}
        for column in self.model_inputs:
            values = [row[ENCODED_PREFIX + column.name] if row else ([] if column.is_list else 0) for row in encoded]
            columns[column.name] = _ragged(values) if column.is_list else np.asarray(values, dtype=column.dtype.to_numpy)
        columns["seen_items"] = _ragged([row["seen_items"] if row else [] for row in raw])
        columns["known"] = known
        return TensorTable(columns)


class PredictQueryTower(_ArtifactOperator):
    """The query tower's SavedModel, called through its serving signature in process.

    ``passthrough`` columns are handed on unchanged, so a later step can use them
    without the graph running the upstream lookup twice.
    """

    artifact_name = "query_tower"
    output_name = "query_embedding"

    def __init__(self, source: Path, passthrough: Schema | None = None):
        super().__init__(source)
        self.passthrough = passthrough or Schema()

    def _load(self, path: Path):
        return load_serving_signature(path)

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema: Schema = None) -> Schema:
        (output_spec,) = self.resource.structured_outputs.values()
        return Schema([ColumnSchema(self.output_name, dtype=np.float32, dims=(None, output_spec.shape[-1]))]) + self.passthrough

    def transform(self, col_selector: ColumnSelector, transformable):
        vectors = call_signature(self.resource, transformable)
        return TensorTable({self.output_name: vectors, **{c: transformable[c] for c in self.passthrough.column_names}})


class RetrieveTopK(_ArtifactOperator):
    """FAISS top-k over the catalogue: dataset item ids and scores, best first.

    With ``seen_items``/``known`` inputs it drops each user's seen items and answers
    unknown users with the most popular items (``is_fallback`` marks those rows).
    """

    artifact_name = "items.faiss"

    def __init__(
        self,
        index_path: Path,
        top_k: int,
        fallback_items: np.ndarray,
        fallback_scores: np.ndarray,
        exclude_seen: bool,
        item_names: np.ndarray | None = None,
        passthrough: Schema | None = None,
    ):
        super().__init__(index_path)
        self.item_names = item_names  # the files' text item id per int id; None: answers carry the int ids
        self.passthrough = passthrough or Schema()  # handed on unchanged (a pre-ranker's query features)
        catalogue_size = self.resource.ntotal
        if top_k > catalogue_size:
            log.warning("top_k=%d exceeds the catalogue of %d items; serving %d", top_k, catalogue_size, catalogue_size)
        self.top_k = min(top_k, catalogue_size)
        self.fallback_items = np.asarray(fallback_items[: self.top_k], dtype=np.int64)
        self.fallback_scores = np.asarray(fallback_scores[: self.top_k], dtype=np.float32)
        self.exclude_seen = exclude_seen

    def _load(self, path: Path):
        import faiss

        # One request's search is tiny: OpenMP threads only add wake-up latency on a busy CPU.
        faiss.omp_set_num_threads(1)
        return ItemIndex(load_index(path))

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema: Schema = None) -> Schema:
        return Schema(
            [
                ColumnSchema("item_ids", dtype=np.int64 if self.item_names is None else md.string, dims=(None, self.top_k)),
                ColumnSchema("scores", dtype=np.float32, dims=(None, self.top_k)),
                ColumnSchema("is_fallback", dtype=md.boolean),
            ]
        ) + self.passthrough

    def _search(self, vectors: np.ndarray, seen: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return self.resource.search(vectors, self.top_k, seen)

    def _seen_lists(self, transformable, n_rows: int) -> list[np.ndarray]:
        if not self.exclude_seen or "seen_items" not in transformable.columns:
            return [np.empty(0, dtype=np.int64)] * n_rows
        column = transformable["seen_items"]
        values, offsets = np.asarray(column.values), np.asarray(column.offsets)
        return [values[offsets[i] : offsets[i + 1]] for i in range(n_rows)]

    def transform(self, col_selector: ColumnSelector, transformable):
        vectors = np.asarray(transformable[PredictQueryTower.output_name].values)
        n_rows = len(vectors)
        known = np.asarray(transformable["known"].values) if "known" in transformable.columns else np.ones(n_rows, bool)
        seen = self._seen_lists(transformable, n_rows)
        item_ids = np.empty((n_rows, self.top_k), dtype=np.int64)
        item_scores = np.empty((n_rows, self.top_k), dtype=np.float32)
        if not known.all():
            item_ids[~known], item_scores[~known] = self.fallback_items, self.fallback_scores
        rows = np.flatnonzero(known)
        if len(rows):
            item_ids[rows], item_scores[rows] = self._search(vectors[rows], [seen[row] for row in rows])
        answer_ids = item_ids if self.item_names is None else self.item_names[item_ids]
        passed = {c: transformable[c] for c in self.passthrough.column_names}
        return TensorTable({"item_ids": answer_ids, "scores": item_scores, "is_fallback": ~known, **passed})


class RetrieveByHeads(RetrieveTopK):
    """``RetrieveTopK`` for a multi-vector model (``model.name=inttower``): the query vector is
    the user's head vectors flattened, the index holds every item head, and each user's union of
    candidates is re-scored by the FE score (``multi_vector.HeadIndex``, ``depth`` rows per head)."""

    def __init__(self, index_path: Path, shape: HeadShape, depth: int, *args, **kwargs):
        self.shape, self.depth = shape, depth  # before the base class loads the index
        super().__init__(index_path, *args, **kwargs)

    def _load(self, path: Path):
        import faiss

        faiss.omp_set_num_threads(1)  # as RetrieveTopK's
        return HeadIndex(load_index(path), self.shape.item_heads)

    def _search(self, vectors: np.ndarray, seen: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return self.resource.search(self.shape.query(vectors), self.top_k, self.depth, seen)


class PrerankCandidates(_ArtifactOperator):
    """The cascade's second stage: a pre-ranker (another run's model, ``serve.prerank_model``)
    scores the retrieved candidates and keeps the best ``top_k``.

    Its query tower runs on the user's features from the same Feast lookup; the candidates' item
    vectors were computed by its item tower at training (an item tower reads item features only,
    so they are what it would compute from the store's item rows). Its saved pair scorer
    (``RetrievalModel.save_pair_scorer``) scores every (user, candidate) pair of the request in one
    call: the dot product, IntTower's FE score or DCN-v2's cross network, whichever it is. Rows
    answered by the popularity fallback pass through unchanged; seen items were excluded by
    retrieval. Only the pre-ranker's query tower, item vectors and pair scorer are copied into the
    export.
    """

    artifact_name = "prerank"
    parts = ("query_tower", "item_vectors.npz", "pair_scorer")  # of the pre-ranker run's model folder

    def __init__(self, model_dir: Path, top_k: int, item_names: np.ndarray | None = None):
        super().__init__(model_dir)
        self.top_k, self.item_names = top_k, item_names

    def _load(self, path: Path):
        from twotower.train import load_item_vectors

        item_ids, vectors = load_item_vectors(path / "item_vectors.npz")
        return load_serving_signature(path / "query_tower"), pd.Index(item_ids), vectors, load_serving_signature(path / "pair_scorer")

    def save_artifacts(self, artifact_path: str) -> None:
        target = Path(artifact_path) / self.artifact_name
        target.mkdir(parents=True, exist_ok=True)
        for part in self.parts:
            source = Path(self.source) / part
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, target / part)

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema: Schema = None) -> Schema:
        return Schema(
            [
                ColumnSchema("item_ids", dtype=np.int64 if self.item_names is None else md.string, dims=(None, self.top_k)),
                ColumnSchema("scores", dtype=np.float32, dims=(None, self.top_k)),
                ColumnSchema("is_fallback", dtype=md.boolean),
            ]
        )

    def transform(self, col_selector: ColumnSelector, transformable):
        import tensorflow as tf

        query_signature, catalogue, item_vectors, pair_scorer = self.resource
        candidates = np.asarray(transformable["item_ids"].values)
        retrieval_scores = np.asarray(transformable["scores"].values)
        fallback = np.asarray(transformable["is_fallback"].values)
        item_ids = candidates[:, : self.top_k].copy()  # fallback rows: the popularity list as it came
        item_scores = retrieval_scores[:, : self.top_k].astype(np.float32)
        rows = np.flatnonzero(~fallback)
        if len(rows):
            positions = catalogue.get_indexer(candidates[rows].reshape(-1)).reshape(len(rows), -1)
            if (positions < 0).any():  # the export checks the catalogues match; a mismatch here is a fault
                raise RuntimeError(f"item {candidates[rows][positions < 0][0]} retrieved but not in the pre-ranker's catalogue")
            query_vectors = call_signature(query_signature, transformable)[rows]
            pairs = {"query": np.repeat(query_vectors, positions.shape[1], axis=0), "items": item_vectors[positions.reshape(-1)]}
            (scores,) = pair_scorer(**{name: tf.constant(values, dtype=tf.float32) for name, values in pairs.items()}).values()
            scores = scores.numpy().reshape(positions.shape)
            best = np.argsort(-scores, axis=1, kind="stable")[:, : self.top_k]
            item_ids[rows] = np.take_along_axis(candidates[rows], best, axis=1)
            item_scores[rows] = np.take_along_axis(scores, best, axis=1)
        answer_ids = item_ids if self.item_names is None else self.item_names[item_ids]
        return TensorTable({"item_ids": answer_ids, "scores": item_scores, "is_fallback": fallback})


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
    trained on, which the online store's features must come from. ``external_ids`` maps text ids
    of the data files to the recipe's int ids and back. With ``prerank``, retrieval fetches
    ``prerank.candidates`` items (and as many fallback items) and the pre-ranker keeps ``top_k``."""
    external_ids = external_ids or ExternalIds()
    prerank_inputs = _signature_schema(PredictQueryTower(prerank.model_dir / "query_tower")) if prerank else Schema()
    model_inputs = _union(_signature_schema(PredictQueryTower(query_tower_dir)), prerank_inputs)
    lookup = OnlineQueryFeatures(feature_repo, model_inputs, max_users, workflow_fingerprint, external_ids.user_codes)
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
    graph = ["user_id"] >> lookup >> PredictQueryTower(query_tower_dir, passthrough=_union(retrieval_inputs, prerank_inputs)) >> retrieve
    if prerank:
        graph = graph >> PrerankCandidates(prerank.model_dir, min(top_k, retrieve.top_k), external_ids.item_names)
    return Ensemble(graph, Schema([ColumnSchema("user_id", dtype=np.int64 if external_ids.user_codes is None else md.string)]))


class ExternalIds(NamedTuple):
    """Text ids of the data files (twotower/data.py gives the recipe int ids for them); None
    where the files' ids are integers and the recipe uses them as they are."""

    user_codes: dict[str, int] | None = None  # text user id -> int id
    item_names: np.ndarray | None = None  # int item id -> text item id (object array of UTF-8 bytes)


def load_external_ids(config: RecipeConfig) -> ExternalIds:
    """The run's text ids, from the tables the data stage wrote."""
    from twotower.data import EXTERNAL_ID, has_text_ids, load_recipe_data

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


def _single_threaded_tensorflow() -> None:
    """A single-user forward pass is small: extra TensorFlow threads only add scheduling latency."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already initialised in this process: keep its setting
        pass


def _signature_schema(tower: PredictQueryTower) -> Schema:
    """The query tower's inputs as Merlin columns (``x__values``/``x__offsets`` are one ragged ``x``)."""
    _, specs = tower.resource.structured_input_signature
    columns: dict[str, ColumnSchema] = {}
    for name, spec in specs.items():
        column, _, part = name.partition(RAGGED_SEPARATOR)
        if part != "offsets":  # a list column's dtype is its values'
            columns[column] = ColumnSchema(column, dtype=spec.dtype.as_numpy_dtype, dims=(None, None) if part else None)
    return Schema([columns[name] for name in dict.fromkeys(n.partition(RAGGED_SEPARATOR)[0] for n in specs)])


def popular_items(config: RecipeConfig, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cold-start answer: the ``count`` (default ``serve.top_k``) catalogue items with most training
    positives, scores as a share of the top item's."""
    from twotower.data import load_split
    from twotower.train import load_item_vectors

    catalogue, _ = load_item_vectors(config.item_vectors_path)
    counts = load_split(config.splits_dir).train["item_id"].value_counts()
    counts = counts[counts.index.isin(catalogue)].head(count or config.serve.top_k)
    return counts.index.to_numpy(dtype=np.int64), (counts / counts.iloc[0]).to_numpy(dtype=np.float32)


def recipe_ensemble(config: RecipeConfig, feature_repo: Path | None = None) -> Ensemble:
    """The serving graph over this run's artifacts (``feature_repo`` defaults to the run's): the
    retriever's own (multi-vector for a model with heads), then the pre-ranker of
    ``serve.prerank_run`` when ``serve.prerank_candidates`` is set."""
    from twotower.config import prerank_config
    from twotower.manifest import fingerprint
    from twotower.models import check_retriever, head_shape

    check_retriever(config.model)
    shape = head_shape(config.model)
    multi_vector = MultiVector(shape, config.model.inttower.search_depth) if shape else None
    prerank = None
    if config.serve.prerank_candidates:
        ranker = prerank_config(config)
        prerank = Prerank(ranker.model_dir, config.serve.prerank_candidates)
    return build_ensemble(
        feature_repo or config.feature_repo_dir,
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


def export_ensemble(
    ensemble: Ensemble, export_dir: Path, model_name: str = MODEL_NAME, finish: Callable[[Path], None] | None = None
) -> Path:
    """Write the model ``model_name`` into the Triton model repository ``export_dir``, replacing an
    older export of it whole: it is built in a staging folder, completed there by ``finish(model_dir)``,
    then swapped in, so a failed or killed export leaves the previous model in place.

    The staging folder sits inside ``export_dir``, at the model's own depth: operators record
    paths relative to it (the Feast repository), and ``export_dir`` may be a volume of its own,
    so a folder outside it could not be renamed in. One left by a killed export is removed by
    the next; the recipe's servers load only ``model_name`` (explicit model control) meanwhile.
    Every export gets the recipe's executor ``model.py`` (its error statuses).
    """
    from twotower.triton_config import install_executor_model

    with atomic_dir(export_dir / model_name) as model_dir:
        ensemble.export(str(export_dir), name=model_dir.name)
        _name_model(model_dir, model_name)
        install_executor_model(model_dir)
        if finish is not None:
            finish(model_dir)
    return export_dir


def model_versions(model_dir: Path) -> list[int]:
    """The version folders of an exported model, oldest first (Triton's: whole numbers)."""
    return sorted(int(path.name) for path in Path(model_dir).iterdir() if path.is_dir() and path.name.isdigit())


def export_version(ensemble: Ensemble, export_dir: Path, model_name: str = MODEL_NAME) -> int:
    """Write the graph as the next version of the already exported ``model_name``, beside the version
    a server may be serving, and return its number; the model's ``config.pbtxt`` stays as it is.

    The version is exported whole into a staging model folder at the model's own depth (operators
    record paths relative to it), then renamed into place in one step, so Triton never sees half
    a version. Versions older than the newest existing one are removed first: the recipe's servers
    serve only the newest (version policy ``latest: 1``), and each copy holds a tower and an index.
    """
    from twotower.triton_config import install_executor_model

    model_dir = export_dir / model_name
    existing = model_versions(model_dir)
    if not existing:
        raise FileNotFoundError(f"no exported model {model_name!r} in {export_dir}; run the 'export' stage")
    for old in existing[:-1]:
        shutil.rmtree(model_dir / str(old))
    version = existing[-1] + 1
    with staging_dir(model_dir) as staging:
        ensemble.export(str(export_dir), name=staging.name)
        install_executor_model(staging)
        (exported_version,) = model_versions(staging)
        os.rename(staging / str(exported_version), model_dir / str(version))
    return version


def _name_model(model_dir: Path, name: str) -> None:
    """Set the model name in ``config.pbtxt`` (merlin-systems writes the folder's, the staging name)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = model_dir / "config.pbtxt"
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    config.name = name
    path.write_text(text_format.MessageToString(config))


def load_exported_ensemble(export_dir: Path, model_name: str = MODEL_NAME) -> Ensemble:
    """The exported graph loaded as the Triton executor loads it (its newest version), to run in process."""
    artifact_dir = export_dir / model_name / str(model_versions(export_dir / model_name)[-1]) / "ensemble"
    ensemble = Ensemble.load(str(artifact_dir))
    for node in postorder_iter_nodes(ensemble.graph.output_node, flatten_subgraphs=True):
        node.op.load_artifacts(str(artifact_dir))
    return ensemble


def recommend_in_process(ensemble: Ensemble, user_ids: np.ndarray) -> dict[str, np.ndarray]:
    from merlin.systems.dag.runtimes.triton import TritonExecutorRuntime

    ids = np.asarray(user_ids)
    ids = ids.astype(np.int64) if ids.dtype.kind in "iu" else ids.astype(object)  # text ids as Triton hands them in
    output = ensemble.transform(TensorTable({"user_id": ids}), runtime=TritonExecutorRuntime())
    return {name: np.asarray(output[name].values) for name in ("item_ids", "scores", "is_fallback")}

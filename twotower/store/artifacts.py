"""Readers and writers of what a run saves and every part reads.

The data stage's tables and splits (canonical columns: ``user_id``, ``item_id``, ``rating``,
``timestamp``; each side table keeps the files' own id in ``external_id``), the declared
schema's columns as the towers and people see them, the trained item vectors, and a saved
tower's serving signature. Stages, serving, lifecycle and benchmarks all read these; none of
them needs another's module to do it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from twotower.config import SchemaConfig

if TYPE_CHECKING:
    from merlin.table import TensorTable

EXTERNAL_ID = "external_id"  # the id as the input files spell it


MODEL_KINDS = ("categorical", "multi_categorical", "continuous")  # the kinds the towers see; text is not


class MissingArtifact(FileNotFoundError):
    """An input that the stage which writes it has not written yet; the message names that stage
    (the command line prints it as one line and exits 2)."""


class DataError(ValueError):
    """Input data the recipe refuses; the message names the file, the column and a row."""


@dataclass
class RecipeData:
    """Interactions with user and item side tables, in the canonical columns (module docstring)."""

    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame


@dataclass
class Split:
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame


def model_features(schema: SchemaConfig, side: str, kinds: tuple[str, ...] = MODEL_KINDS) -> list[str]:
    """The declared ``side`` ("user" or "item") features of ``kinds``, in declaration order."""
    declared = schema.user_features if side == "user" else schema.item_features
    return [name for name, kind in declared.items() if kind in kinds]


def display_column(schema: SchemaConfig) -> str | None:
    """The item column people read beside an id: the first text feature, if any."""
    return next(iter(model_features(schema, "item", ("text",))), None)


def category_feature(schema: SchemaConfig) -> str | None:
    """The item feature that groups items for people (genres on MovieLens): the first
    multi-valued categorical one, else the first categorical one."""
    return next(
        iter(model_features(schema, "item", ("multi_categorical",)) + model_features(schema, "item", ("categorical",))),
        None,
    )


def item_names(items: pd.DataFrame, schema: SchemaConfig) -> pd.Series:
    """Item id -> what people read: the display column (titles), else the files' id."""
    column = display_column(schema) or EXTERNAL_ID
    return items.set_index("item_id")[column].astype(str)


def has_text_ids(ids: pd.Series) -> bool:
    """Whether a table's ``external_id`` column holds text ids (else the recipe's int ids are the files')."""
    return ids.dtype == object


SPLITS = ("train", "valid", "test")


TABLES = ("interactions", "users", "items")


def load_recipe_data(data_dir: Path) -> RecipeData:
    """The tables the 'data' stage wrote under ``data_dir``."""
    try:
        return RecipeData(*(pd.read_parquet(data_dir / f"{name}.parquet") for name in TABLES))
    except FileNotFoundError as error:
        raise MissingArtifact(f"{error.filename} missing: run the 'data' stage first") from error


def load_split(splits_dir: Path) -> Split:
    return Split(*(pd.read_parquet(splits_dir / f"{name}.parquet") for name in SPLITS))


def known_before_test(split: Split) -> pd.DataFrame:
    """Positives before the test period: the history the server and the test evaluation see."""
    return pd.concat([split.train, split.valid])


def save_item_vectors(item_ids: np.ndarray, vectors: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, item_ids=item_ids, vectors=vectors.astype(np.float32))


def load_item_vectors(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as saved:
        return saved["item_ids"], saved["vectors"]


RAGGED_SEPARATOR = "__"


# What serving freezes: a frozen tower carries its weights inside the GraphDef, a protobuf limited to
# 2 GB, so towers whose saved variables are larger keep them as variables.
FREEZE_MAX_BYTES = 512 * 2**20


class ServingSignature:
    """A saved tower's ``serving_default`` signature, run in a TensorFlow session of its own
    (plain TensorFlow, no Keras or Merlin objects, so the executor does not import merlin.models).

    Called with NumPy arrays by input name, it answers with the NumPy output. Not the eager
    signature: in TensorFlow 2.12 every eager tensor left a small block allocated (tracemalloc:
    about 0.3 KB a served request, the server's steady memory growth), and a session's callable
    answers in less time. The session runs it through a callable made once from tensor names,
    skipping ``Session.run``'s per-call feed checks, in the calling thread. One thread per call: a
    request is small, more threads only add scheduling latency.

    A tower whose saved variables take at most ``freeze_max_bytes`` (serving passes
    ``FREEZE_MAX_BYTES``; 0, the default: never) is frozen (its variables become constants, the
    function call is inlined): a third fewer ops run a request, one user's query vector took 0.46
    ms against 0.60 ms (``docs/benchmarks/serving.md``), but loading takes about a second more,
    which one-off batch calls (evaluation, refresh-items) do not win back.
    """

    def __init__(self, path: Path, freeze_max_bytes: int = 0):
        import tensorflow as tf
        from tensorflow.core.protobuf import config_pb2

        threads = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=1)
        self._session = tf.compat.v1.Session(graph=tf.Graph(), config=threads)
        weight_bytes = sum(part.stat().st_size for part in (Path(path) / "variables").glob("variables.data-*"))
        self.frozen = weight_bytes <= freeze_max_bytes
        load = _frozen_signature if self.frozen else _variable_signature
        feeds, fetch, self.input_dtypes, self.output_dim = load(path, self._session)
        # inter_op_thread_pool -1: the ops run in the calling thread, saving a hand-over to the session's
        # own thread and back on every call (0.13 ms of one user's 0.64 ms)
        in_caller = config_pb2.RunOptions(inter_op_thread_pool=-1)
        run = self._session._make_callable_from_options(
            config_pb2.CallableOptions(feed=feeds, fetch=[fetch], run_options=in_caller)
        )
        # Released with this object, or at exit before TensorFlow's modules are torn down (a callable
        # released during the teardown prints an ignored AttributeError).
        self._runs = [run]
        weakref.finalize(self, self._runs.clear)

    def __call__(self, **arrays: np.ndarray) -> np.ndarray:
        (run,) = self._runs
        (output,) = run(*(np.asarray(arrays[name], dtype=dtype) for name, dtype in self.input_dtypes.items()))
        return output


def _frozen_signature(path: Path, session) -> tuple[list[str], str, dict[str, type], int]:
    """Import the frozen ``serving_default`` of the SavedModel at ``path`` into ``session``'s graph:
    its feed and fetch tensor names, the input dtypes by input name and the output's width."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    loaded = tf.saved_model.load(str(path))  # holds the variables the function reads until it is frozen
    function = loaded.signatures["serving_default"]
    frozen = convert_variables_to_constants_v2(function)
    with session.graph.as_default():
        tf.graph_util.import_graph_def(frozen.graph.as_graph_def(), name="")
    # The function's inputs follow its keyword arguments in sorted order (tf.nest flattens dicts so).
    specs = sorted(function.structured_input_signature[1].items())
    input_dtypes = {name: spec.dtype.as_numpy_dtype for name, spec in specs}
    feeds = [tensor.name for tensor in frozen.inputs[: len(specs)]]
    for (name, spec), tensor in zip(specs, frozen.inputs):
        if tensor.dtype != spec.dtype:
            raise ValueError(f"{path}: the frozen signature's input {tensor.name} does not match {name!r}")
    (output,) = frozen.outputs
    width = output.shape[-1]  # None, as the saved signature's -1, where unknown (a scorer's [n] scores)
    return feeds, output.name, input_dtypes, -1 if width is None else int(width)


def _variable_signature(path: Path, session) -> tuple[list[str], str, dict[str, type], int]:
    """``_frozen_signature`` for a tower too large to freeze: the SavedModel loaded as it is, its
    variables restored in ``session``."""
    import tensorflow as tf

    with session.graph.as_default():
        signature = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(path)).signature_def["serving_default"]
    input_dtypes = {name: tf.dtypes.as_dtype(t.dtype).as_numpy_dtype for name, t in sorted(signature.inputs.items())}
    ((_, output),) = signature.outputs.items()
    feeds = [signature.inputs[name].name for name in input_dtypes]
    return feeds, output.name, input_dtypes, output.tensor_shape.dim[-1].size


def call_signature(signature: ServingSignature, features: TensorTable | pd.DataFrame) -> np.ndarray:
    """Run a serving signature on encoded feature columns, feeding only its inputs."""
    from merlin.table import TensorTable

    table = features if isinstance(features, TensorTable) else TensorTable.from_df(features.reset_index(drop=True))
    inputs = {}
    for name in signature.input_dtypes:
        # merlin-models' signature takes list features as <name>__values / <name>__offsets.
        column, _, part = name.partition(RAGGED_SEPARATOR)
        data = table[column]
        inputs[name] = np.asarray({"values": data.values, "offsets": data.offsets, "": data.values}[part]).reshape(-1)
    return signature(**inputs)

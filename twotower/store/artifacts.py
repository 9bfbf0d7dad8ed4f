"""Readers and writers of what a run saves and every part reads.

The data stage's tables and splits (canonical columns: ``user_id``, ``item_id``, ``rating``,
``timestamp``; each side table keeps the files' own id in ``external_id``), the declared
schema's columns as the towers and people see them, the trained item vectors, and a saved
tower's serving signature. Stages, serving, lifecycle and benchmarks all read these; none of
them needs another's module to do it.
"""

from __future__ import annotations

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


class ServingSignature:
    """A saved tower's ``serving_default`` signature, run in a TensorFlow session of its own
    (plain TensorFlow, no Keras or Merlin objects, so the executor does not import merlin.models).

    Called with NumPy arrays by input name, it answers with the NumPy output. Not the eager
    signature: in TensorFlow 2.12 every eager tensor left a small block allocated (tracemalloc:
    about 0.3 KB a served request, the server's steady memory growth), and a session's callable
    answers in less time. One thread per call: a request is small, more threads only add
    scheduling latency.
    """

    def __init__(self, path: Path):
        import tensorflow as tf

        graph = tf.Graph()
        threads = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=1)
        self._session = tf.compat.v1.Session(graph=graph, config=threads)
        with graph.as_default():
            signature = tf.compat.v1.saved_model.loader.load(self._session, ["serve"], str(path)).signature_def[
                "serving_default"
            ]
        self.input_dtypes = {name: tf.dtypes.as_dtype(t.dtype).as_numpy_dtype for name, t in signature.inputs.items()}
        ((_, output),) = signature.outputs.items()
        self.output_dim = output.tensor_shape.dim[-1].size
        self._run = self._session.make_callable(
            output.name, [signature.inputs[name].name for name in self.input_dtypes]
        )

    def __call__(self, **arrays: np.ndarray) -> np.ndarray:
        return self._run(*(np.asarray(arrays[name], dtype=dtype) for name, dtype in self.input_dtypes.items()))


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

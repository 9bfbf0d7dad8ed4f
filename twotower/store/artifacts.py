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
    from merlin.table import TensorTable

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


def _single_threaded_tensorflow() -> None:
    """A single-user forward pass is small: extra TensorFlow threads only add scheduling latency."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already initialised in this process: keep its setting
        pass

"""Top-k for many users without a server: ``twotower recommend --users FILE|all --out recs.parquet``.

The answers come from the exported Triton model itself (the graph the server runs: Feast
lookup, query tower, FAISS, seen items excluded, popularity for unknown users), loaded and
run in this process in batches of at most ``serve.max_request_users``, the largest request
the graph accepts.

The user list (``--users``), ids as the data files spell them (what the server takes):
- ``all``: every user of the run's data (the ``data`` stage's ``users.parquet``);
- a ``.parquet`` or ``.csv`` file with a ``user_id`` column (a CSV needs a header line);
- any other file: plain text, one user id per line (blank lines are skipped).
Where the run's ids are integers, every id must be one. A repeated id is answered once, where
it first appears, and the count of repeats dropped is printed. Ids the run does not know get
the most popular items, flagged ``is_fallback``, as from the server.

The output has one row per user and rank (long format): user_id, rank (1 = best), item_id,
score, is_fallback; users in the order of the list, ids spelled as in the data files (text ids
as strings).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np
import pandas as pd

from twotower.store.artifacts import EXTERNAL_ID, has_text_ids, load_recipe_data
from twotower.store.atomic import atomic_file

if TYPE_CHECKING:
    from merlin.systems.dag.ensemble import Ensemble

    from twotower.config import RecipeConfig

USER_ID_COLUMN = "user_id"
ALL_USERS = "all"
PROGRESS_LINES = 10  # about this many progress lines per job, whatever its size


class RecommendError(ValueError):
    """The batch job cannot run as asked; the message says what to fix, in one line."""


@dataclass(frozen=True)
class UserList:
    ids: np.ndarray  # int64, or str objects where the run's ids are text; distinct, in the order first given
    repeats_dropped: int


def run_user_ids(data_dir: Path) -> pd.Series:
    """The run's users, ids as the data files spell them (what the server takes)."""

    try:
        return load_recipe_data(data_dir).users[EXTERNAL_ID]
    except FileNotFoundError as error:  # its message names the stage to run
        raise RecommendError(str(error)) from None


def read_user_file(path: Path) -> pd.Series:
    """The raw values of a user list file, not yet checked."""
    if not path.is_file():
        raise RecommendError(f"user list {path} does not exist (give a file of user ids or 'all')")
    if path.suffix in (".parquet", ".csv"):
        table = (
            pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype=str, keep_default_na=False)
        )
        if USER_ID_COLUMN not in table.columns:
            raise RecommendError(
                f"user list {path} has no '{USER_ID_COLUMN}' column (columns: {', '.join(map(str, table.columns))})"
            )
        return table[USER_ID_COLUMN]
    lines = (line.strip() for line in path.read_text().splitlines())
    return pd.Series([line for line in lines if line], dtype=object)


def distinct_user_ids(values: pd.Series, source: str, text_ids: bool) -> UserList:
    """The ids, each once, in the order first given: text, or integers (a value that is not
    one is refused)."""
    if values.empty:
        raise RecommendError(f"user list {source} holds no user ids")
    missing = (values.isna() | (values.astype(str).str.strip() == "")).to_numpy()
    if missing.any():
        raise RecommendError(
            f"user list {source}: {int(missing.sum())} empty user id(s), the first in row {missing.argmax() + 1}"
        )
    if text_ids:
        ids = values.astype(str)
    else:
        numbers = pd.to_numeric(values, errors="coerce")
        bad = numbers.isna() | (numbers != numbers.round())
        if bad.any():
            raise RecommendError(
                f"user list {source}: {values[bad].iloc[0]!r} is not an integer user id, "
                f"as this run's are ({int(bad.sum())} such value(s))"
            )
        ids = numbers.astype(np.int64)
    distinct = ids.drop_duplicates().to_numpy()
    return UserList(distinct, len(ids) - len(distinct))


def load_served_graph(export_dir: Path, model_name: str) -> Ensemble:
    """The exported Triton model, loaded as the server's executor loads it."""
    from twotower.serving.export import load_exported_ensemble

    if not (export_dir / model_name).is_dir():
        raise RecommendError(
            f"no exported model '{model_name}' in {export_dir}: run `twotower export` (or `twotower all`) first"
        )
    return load_exported_ensemble(export_dir, model_name)


def _as_written(item_ids: np.ndarray) -> np.ndarray:
    """Integer ids as int64; text ids, which the graph answers as bytes, as str."""
    return (
        item_ids.astype(np.int64)
        if item_ids.dtype.kind in "iu"
        else np.array([i.decode() for i in item_ids], dtype=object)
    )


def long_format(user_ids: np.ndarray, answer: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per user and rank from the graph's (users, k) outputs."""
    users, k = answer["item_ids"].shape
    return pd.DataFrame(
        {
            "user_id": np.repeat(user_ids, k),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), users),
            "item_id": _as_written(answer["item_ids"].reshape(-1)),
            "score": answer["scores"].reshape(-1).astype(np.float32),
            "is_fallback": np.repeat(answer["is_fallback"].reshape(-1).astype(bool), k),
        }
    )


def recommend_users(
    ensemble: Ensemble, user_ids: np.ndarray, batch_size: int, progress: TextIO | None = None
) -> pd.DataFrame:
    """Top-k of every user, ``batch_size`` users per call of the graph, with a progress line on
    ``progress`` (default: stderr) about every tenth of the job."""
    from twotower.serving.export import recommend_in_process

    progress = progress or sys.stderr

    batches = [user_ids[start : start + batch_size] for start in range(0, len(user_ids), batch_size)]
    report_every = max(1, len(batches) // PROGRESS_LINES)
    started, done, frames = time.perf_counter(), 0, []
    for number, batch in enumerate(batches, start=1):
        frames.append(long_format(batch, recommend_in_process(ensemble, batch)))
        done += len(batch)
        if number % report_every == 0 or number == len(batches):
            print(
                f"[recommend] {done:,}/{len(user_ids):,} users "
                f"(batch {number}/{len(batches)}, {time.perf_counter() - started:.1f} s)",
                file=progress,
                flush=True,
            )
    return pd.concat(frames, ignore_index=True)


def write_recommendations(frame: pd.DataFrame, out: Path) -> None:
    """Replaces ``out`` whole: a failed or killed job leaves an older file as it was."""
    with atomic_file(out) as staging:
        frame.to_parquet(staging, index=False)


def run_recommend(config: RecipeConfig, users: str, out: Path) -> pd.DataFrame:
    """The ``recommend`` command: read the list, answer it from the export, write ``out``."""

    listed = None if users == ALL_USERS else read_user_file(Path(users))  # a bad file is refused before anything loads
    served = run_user_ids(config.data_dir)
    user_list = distinct_user_ids(served if listed is None else listed, users, text_ids=has_text_ids(served))
    ensemble = load_served_graph(config.export_dir, config.serve.model_name)
    source = "every user of the run" if users == ALL_USERS else f"from {users}"
    repeats = f"; {user_list.repeats_dropped:,} repeated id(s) answered once" if user_list.repeats_dropped else ""
    print(
        f"[recommend] {len(user_list.ids):,} users ({source}{repeats}), {config.serve.max_request_users:,} per batch",
        flush=True,
    )
    frame = recommend_users(ensemble, user_list.ids, config.serve.max_request_users)
    write_recommendations(frame, out)
    print(f"[recommend] {len(frame):,} rows ({frame['rank'].max()} per user) written to {out}", flush=True)
    return frame

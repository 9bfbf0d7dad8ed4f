"""The event endpoint: the ``record_events`` model beside the recommender in the Triton model
repository, its checks of a batch, and where a served version finds the run's events.

Every version of the recommender and the event model read the same ``events/`` folder of the
run (``twotower.store.events``), named relative to the exported version, so the output folder and
the model repository can move together; ``TWOTOWER_EVENTS_DIR`` names another one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from twotower.serving.errors import RequestError
from twotower.store.atomic import atomic_dir
from twotower.store.events import EventBatch, as_text_ids

EVENTS_MODEL = "record_events"


EVENTS_SETTINGS = "events.json"  # in each version folder of the event model


EVENTS_DIR_ENV = "TWOTOWER_EVENTS_DIR"


EVENTS_MODEL_SOURCE = Path(__file__).with_name("events_model.py")


FUTURE_LIMIT_S = 86_400  # an event more than a day ahead of the server's clock is a client's mistake


def events_dir_of(version_dir: Path, relative: str | None) -> Path:
    """The run's events folder as an exported version names it (``relative`` to its folder), or
    ``TWOTOWER_EVENTS_DIR``; the executor's graph and the event model both find it here."""
    override = os.environ.get(EVENTS_DIR_ENV)
    return Path(override).resolve() if override else (Path(version_dir) / relative).resolve()


def check_events(
    user_ids: np.ndarray | None,
    item_ids: np.ndarray | None,
    timestamps: np.ndarray | None,
    labels: np.ndarray | None,
    text_ids: dict[str, bool],
) -> EventBatch:
    """A request's columns as an ``EventBatch``; RequestError (one line) for anything a client got wrong."""
    for name, values in (("user_id", user_ids), ("item_id", item_ids), ("timestamp", timestamps)):
        if values is None:
            raise RequestError(f"missing input '{name}'")
    if len(user_ids) == 0:
        raise RequestError("empty request: no events")
    for name, values in (("user_id", user_ids), ("item_id", item_ids)):
        if text_ids[name]:
            empty = [row for row, value in enumerate(values.tolist()) if not value or not str(value).strip()]
            if empty:
                raise RequestError(f"'{name}' is empty in row {empty[0]}")
    latest = time.time() + FUTURE_LIMIT_S
    late = np.flatnonzero((timestamps <= 0) | (timestamps > latest))
    if len(late):
        raise RequestError(
            "'timestamp' must be integer seconds since 1970 and not over a day ahead; "
            f"row {late[0]} has {timestamps[late[0]]}"
        )
    if labels is not None:
        bad = [row for row, value in enumerate(labels.tolist()) if not math.isfinite(value)]
        if bad:
            raise RequestError(f"'label' is not a number in row {bad[0]}")
    return EventBatch(
        as_text_ids(user_ids),
        as_text_ids(item_ids),
        [int(t) for t in timestamps.tolist()],
        [None] * len(user_ids) if labels is None else [float(v) for v in labels.tolist()],
    )


def _events_config(text_ids: dict[str, bool], max_rows: int) -> model_config_pb2.ModelConfig:
    config = model_config_pb2.ModelConfig(name=EVENTS_MODEL, backend="python", max_batch_size=max_rows)
    for name in ("user_id", "item_id"):
        kind = model_config_pb2.TYPE_STRING if text_ids[name] else model_config_pb2.TYPE_INT64
        config.input.add(name=name, data_type=kind, dims=[1])
    config.input.add(name="timestamp", data_type=model_config_pb2.TYPE_INT64, dims=[1])
    config.input.add(name="label", data_type=model_config_pb2.TYPE_FP32, dims=[1], optional=True)
    config.output.add(name="accepted", data_type=model_config_pb2.TYPE_INT64, dims=[1])
    # One instance: batches are appended in the order they arrive, and a second stub would only wait for the lock.
    config.instance_group.add(count=1, kind=model_config_pb2.ModelInstanceGroup.KIND_CPU)
    return config


def export_events_model(export_dir: Path, events_dir: Path, text_ids: dict[str, bool], max_rows: int) -> None:
    """Write ``record_events`` into the model repository ``export_dir`` (replacing an older one whole)."""
    if max_rows < 1:
        raise ValueError(f"serve.max_event_rows must be >= 1, got {max_rows}")
    with atomic_dir(export_dir / EVENTS_MODEL) as model_dir:
        version_dir = model_dir / "1"
        version_dir.mkdir(parents=True)
        shutil.copy2(EVENTS_MODEL_SOURCE, version_dir / "model.py")
        # relative to the version's final place (the staging folder sits at the same depth)
        final_version = export_dir / EVENTS_MODEL / "1"
        events_path = os.path.relpath(Path(events_dir).resolve(), final_version.resolve())
        settings = {"events_dir": events_path, "text_ids": text_ids}
        (version_dir / EVENTS_SETTINGS).write_text(json.dumps(settings, indent=1))
        (model_dir / "config.pbtxt").write_text(text_format.MessageToString(_events_config(text_ids, max_rows)))

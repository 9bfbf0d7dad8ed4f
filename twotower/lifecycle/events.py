"""``twotower events --file FILE``: send a file of events to the running server's event endpoint.

The whole file is read and checked first, as the server checks a batch (ids of the run's kinds,
times in integer seconds, labels numbers), so a bad row anywhere changes nothing; then it goes out
in requests of ``serve.max_event_rows`` events.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tritonclient.utils import InferenceServerException

from twotower.config import RecipeConfig
from twotower.serving.client import send_events
from twotower.serving.errors import RequestError
from twotower.serving.events import check_events
from twotower.stages.data import read_events
from twotower.store.artifacts import EXTERNAL_ID, DataError, has_text_ids, load_recipe_data


class EventsRefused(RuntimeError):
    """The file or the server refused the events (one line for the command line)."""


def _wire_ids(ids, text: bool, column: str, source: str) -> np.ndarray:
    """Ids as the endpoint takes them: text, or integers where the run's ids are."""
    if text:
        return np.asarray(ids.astype(str), dtype=object)
    if ids.dtype.kind not in "iu":
        raise DataError(f"{source}: the run's {column}s are integers; the file has {ids.iloc[0]!r}")
    return ids.to_numpy(dtype=np.int64)


def send_events_file(config: RecipeConfig, path: Path, url: str | None = None) -> str:
    """Send the events of ``path`` to the server at ``url`` (default: the configured gRPC address);
    a line saying how many were accepted."""
    events, labelled = read_events(str(path), config.data.schema)
    data = load_recipe_data(config.data_dir)
    text = {
        "user_id": has_text_ids(data.users[EXTERNAL_ID]),
        "item_id": has_text_ids(data.items[EXTERNAL_ID]),
    }
    users = _wire_ids(events["user_id"], text["user_id"], "user id", str(path))
    items = _wire_ids(events["item_id"], text["item_id"], "item id", str(path))
    times = events["timestamp"].to_numpy(dtype=np.int64)
    labels = events["rating"].to_numpy(dtype=np.float32) if labelled else None
    try:
        check_events(users, items, times, labels, text)
    except RequestError as error:
        raise EventsRefused(f"{path}: {error}") from None
    url = url or f"{config.serve.host}:{config.serve.grpc_port}"
    size, accepted = config.serve.max_event_rows, 0
    for start in range(0, len(events), size):
        part = slice(start, start + size)
        try:
            accepted += send_events(
                users[part],
                items[part],
                times[part],
                None if labels is None else labels[part],
                url,
                config.serve.client_timeout_s,
            )
        except InferenceServerException as error:
            raise EventsRefused(
                f"the server at {url} refused events {start} to {min(start + size, len(events)) - 1} "
                f"({accepted} accepted before): {error.message()}"
            ) from None
    return f"[events] {accepted} events of {path} accepted by {url}"

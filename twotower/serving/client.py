"""gRPC client of the served recommender (what an application would call)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import tritonclient.grpc as grpcclient

from twotower.serving.events import EVENTS_MODEL
from twotower.store.artifacts import EXTERNAL_ID, DataError, display_column, has_text_ids, load_recipe_data, load_split

if TYPE_CHECKING:
    from twotower.config import RecipeConfig

OUTPUTS = ("item_ids", "scores", "is_fallback")
DEFAULT_TIMEOUT_S = 30.0


def id_input(name: str, ids: list[int] | list[str] | np.ndarray) -> grpcclient.InferInput:
    """An id input tensor for a batch of ids, shaped [n, 1] (a row per id on Triton's batch
    dimension): INT64, or BYTES for text ids."""
    ids = np.asarray(ids).reshape(-1, 1)
    if ids.dtype.kind not in "OUS":  # numbers (and an empty batch, which NumPy makes float)
        request = grpcclient.InferInput(name, list(ids.shape), "INT64")
        request.set_data_from_numpy(ids.astype(np.int64))
    else:
        request = grpcclient.InferInput(name, list(ids.shape), "BYTES")
        # bytes as the server returns text ids (an answer's item ids sent back as events), str as typed
        text = np.array([u if isinstance(u, bytes) else str(u).encode() for u in ids.reshape(-1)], dtype=object)
        request.set_data_from_numpy(text.reshape(ids.shape))
    return request


def user_id_request(user_ids: list[int] | list[str] | np.ndarray) -> grpcclient.InferInput:
    """The recommender's ``user_id`` input for a batch of user ids."""
    return id_input("user_id", user_ids)


def recommend(
    user_ids: list[int] | list[str] | np.ndarray,
    url: str = "127.0.0.1:8001",
    model_name: str = "executor_model",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, np.ndarray]:
    """Top-k item ids (as the data files spell them), scores (best first), [n, k] each, and the
    cold-start flag [n] for each user id (ints, or text where the data's ids are text; text item
    ids come back as bytes).

    Raises ``tritonclient.utils.InferenceServerException``: status ``StatusCode.INVALID_ARGUMENT``
    for a request the service refuses, ``DEADLINE_EXCEEDED`` after ``timeout_s``.
    """
    request = user_id_request(user_ids)
    with grpcclient.InferenceServerClient(url) as client:
        result = client.infer(
            model_name,
            [request],
            outputs=[grpcclient.InferRequestedOutput(n) for n in OUTPUTS],
            client_timeout=timeout_s,
        )
    answer = {name: result.as_numpy(name) for name in OUTPUTS}
    answer["is_fallback"] = answer["is_fallback"].reshape(-1)  # [n, 1] on the wire
    return answer


def send_events(
    user_ids: list[int] | list[str] | np.ndarray,
    item_ids: list[int] | list[str] | np.ndarray,
    timestamps: list[int] | np.ndarray,
    labels: list[float] | np.ndarray | None = None,
    url: str = "127.0.0.1:8001",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> int:
    """Record events (a user interacted with an item at a time in integer seconds, with a rating or
    label if given) through the server's ``record_events`` model, in one request of at most
    ``serve.max_event_rows``; once it returns they shape the users' next answers. Returns how many
    were accepted. Raises ``InferenceServerException`` (INVALID_ARGUMENT for a bad batch, which
    changes nothing)."""
    inputs = [id_input("user_id", user_ids), id_input("item_id", item_ids)]
    inputs.append(number_input("timestamp", timestamps, "INT64"))
    if labels is not None:
        inputs.append(number_input("label", labels, "FP32"))
    with grpcclient.InferenceServerClient(url) as client:
        result = client.infer(
            EVENTS_MODEL, inputs, outputs=[grpcclient.InferRequestedOutput("accepted")], client_timeout=timeout_s
        )
    return int(result.as_numpy("accepted").sum())


def number_input(name: str, values: list | np.ndarray, datatype: str) -> grpcclient.InferInput:
    """A numeric input tensor of type ``datatype`` (INT64, FP32), shaped [n, 1]."""
    values = np.asarray(values).reshape(-1, 1)
    request = grpcclient.InferInput(name, list(values.shape), datatype)
    request.set_data_from_numpy(values.astype(np.int64 if datatype == "INT64" else np.float32))
    return request


def print_recommendations(config: RecipeConfig, user_ids: list, url: str | None = None) -> None:
    """Ask the server at ``url`` (default: the configured gRPC address) and print the items
    with their display column (the first text item feature, such as the title)."""

    items = load_recipe_data(config.data_dir).items
    column = display_column(config.data.schema)
    names = items.set_index(items[EXTERNAL_ID].astype(str))[column] if column else pd.Series(dtype=object)
    url = url or f"{config.serve.host}:{config.serve.grpc_port}"
    answer = recommend(user_ids, url, config.serve.model_name, config.serve.client_timeout_s)
    for user_id, row_items, row_scores, fallback in zip(
        user_ids, answer["item_ids"], answer["scores"], answer["is_fallback"]
    ):
        print(f"\nuser {user_id}{' (unknown: most popular items)' if fallback else ''}:")
        for rank, (item_id, score) in enumerate(zip(row_items, row_scores), start=1):
            item = item_id.decode() if isinstance(item_id, bytes) else str(item_id)
            print(f"  {rank:>2}. [{item:>5}] {str(names.get(item, '')):<60} {score:7.4f}")


def typed_user_ids(config: RecipeConfig, user_ids: list[str]) -> list:
    """Command-line user ids as the run's data types them: ints, or text where the files' ids are text."""

    if has_text_ids(load_recipe_data(config.data_dir).users[EXTERNAL_ID]):
        return list(user_ids)
    try:
        return [int(u) for u in user_ids]
    except ValueError as error:  # the CLI prints a DataError as one line and exits 2
        raise DataError(f"user ids of this run are integers: {error}") from None


def demo_users(config: RecipeConfig, count: int = 3) -> list:
    """The first ``count`` test users, as the data files spell their ids: known to the service,
    with held-out positives."""

    test_users = load_split(config.splits_dir).test["user_id"].drop_duplicates().head(count)
    external = load_recipe_data(config.data_dir).users.set_index("user_id")[EXTERNAL_ID]
    return external.loc[test_users].tolist()

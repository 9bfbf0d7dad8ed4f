"""gRPC client of the served recommender (what an application would call)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import tritonclient.grpc as grpcclient

if TYPE_CHECKING:
    from twotower.config import RecipeConfig

OUTPUTS = ("item_ids", "scores", "is_fallback")
DEFAULT_TIMEOUT_S = 30.0


def user_id_request(user_ids: np.ndarray) -> grpcclient.InferInput:
    """The ``user_id`` input tensor for a batch of INT64 dataset user ids."""
    request = grpcclient.InferInput("user_id", list(user_ids.shape), "INT64")
    request.set_data_from_numpy(user_ids)
    return request


def recommend(
    user_ids: list[int] | np.ndarray,
    url: str = "127.0.0.1:8001",
    model_name: str = "executor_model",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, np.ndarray]:
    """Top-k dataset item ids, scores (best first) and the cold-start flag for each user id.

    Raises ``tritonclient.utils.InferenceServerException``: status ``StatusCode.INVALID_ARGUMENT``
    for a request the service refuses, ``DEADLINE_EXCEEDED`` after ``timeout_s``.
    """
    request = user_id_request(np.asarray(user_ids, dtype=np.int64).reshape(-1))
    with grpcclient.InferenceServerClient(url) as client:
        result = client.infer(
            model_name, [request], outputs=[grpcclient.InferRequestedOutput(n) for n in OUTPUTS], client_timeout=timeout_s
        )
    return {name: result.as_numpy(name) for name in OUTPUTS}


def print_recommendations(config: RecipeConfig, user_ids: list[int], url: str | None = None) -> None:
    """Ask the server at ``url`` (default: the configured gRPC address) and print titles."""
    from twotower.data import load_recipe_data

    titles = load_recipe_data(config.data_dir).items.set_index("item_id")["title"]
    url = url or f"{config.serve.host}:{config.serve.grpc_port}"
    answer = recommend(user_ids, url, config.serve.model_name, config.serve.client_timeout_s)
    for user_id, row_items, row_scores, fallback in zip(user_ids, answer["item_ids"], answer["scores"], answer["is_fallback"]):
        print(f"\nuser {user_id}{' (unknown: most popular items)' if fallback else ''}:")
        for rank, (item_id, score) in enumerate(zip(row_items, row_scores), start=1):
            print(f"  {rank:>2}. [{item_id:>5}] {titles.get(item_id, '?'):<60} {score:7.4f}")


def demo_users(config: RecipeConfig, count: int = 3) -> list[int]:
    """The first ``count`` test users: known to the service, with held-out positives."""
    from twotower.data import load_split

    return load_split(config.splits_dir).test["user_id"].drop_duplicates().head(count).astype(int).tolist()

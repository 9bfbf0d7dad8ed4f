"""gRPC client of the served recommender (what an application would call)."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient

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

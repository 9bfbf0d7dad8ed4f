"""gRPC client of the served recommender (what an application would call)."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient


def recommend(user_ids: list[int] | np.ndarray, url: str = "127.0.0.1:8001", model_name: str = "executor_model") -> tuple[np.ndarray, np.ndarray]:
    """Top-k dataset item ids and scores for each user id, best first."""
    ids = np.asarray(user_ids, dtype=np.int64).reshape(-1)
    request = grpcclient.InferInput("user_id", list(ids.shape), "INT64")
    request.set_data_from_numpy(ids)
    outputs = [grpcclient.InferRequestedOutput("item_ids"), grpcclient.InferRequestedOutput("scores")]
    with grpcclient.InferenceServerClient(url) as client:
        result = client.infer(model_name, [request], outputs=outputs)
    return result.as_numpy("item_ids"), result.as_numpy("scores")

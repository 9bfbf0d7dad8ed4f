"""What the graph's operators share: request ids and columns, and the operator backed by one
saved artifact that the export copies into the executor's folder.

Operators keep no absolute path in the pickled graph, so the exported repository can move.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from merlin.dag import BaseOperator
from merlin.table import TensorColumn, TensorTable

from twotower.serving.errors import RequestError


def as_frame(transformable) -> pd.DataFrame:
    return transformable.to_df() if isinstance(transformable, TensorTable) else transformable


def request_user_ids(transformable, max_users: int) -> np.ndarray:
    """The request's user ids, rejecting an empty or oversized batch."""
    user_ids = np.asarray(
        transformable["user_id"].values if isinstance(transformable, TensorTable) else transformable["user_id"]
    ).reshape(-1)
    if len(user_ids) == 0:
        raise RequestError("empty request: 'user_id' has no rows")
    if len(user_ids) > max_users:
        raise RequestError(f"request has {len(user_ids)} users; the maximum is {max_users} (serve.max_request_users)")
    return user_ids


def ragged_column(lists: list[list[int]]) -> TensorColumn:
    offsets = np.concatenate([[0], np.cumsum([len(v) for v in lists])]).astype(np.int32)
    return TensorColumn(np.fromiter((x for v in lists for x in v), dtype=np.int64, count=offsets[-1]), offsets=offsets)


class ArtifactOperator(BaseOperator):
    """An operator backed by one file or folder, copied into the export on save.

    In process it reads ``source``; after export it reads the copy named
    ``artifact_name`` inside the executor's artifact folder.
    """

    artifact_name = ""

    def __init__(self, source: Path):
        super().__init__()
        self.source = str(source)
        self._resource = None

    def _load(self, path: Path):
        raise NotImplementedError

    @property
    def resource(self):
        if self._resource is None:
            self._resource = self._load(Path(self.source))
        return self._resource

    def save_artifacts(self, artifact_path: str) -> None:
        target = Path(artifact_path) / self.artifact_name
        if Path(self.source).is_dir():
            shutil.copytree(self.source, target, dirs_exist_ok=True)
        else:
            shutil.copy2(self.source, target)

    def load_artifacts(self, artifact_path: str) -> None:
        # Merlin's Graph calls this with "" while building, meaning "load in place".
        if artifact_path:
            self.source = str(Path(artifact_path) / self.artifact_name)
        self._resource = self._load(Path(self.source))

    def __getstate__(self) -> dict:
        # The export folder supplies the path again on load.
        return {**self.__dict__, "source": None, "_resource": None}

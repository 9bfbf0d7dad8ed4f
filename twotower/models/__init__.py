"""The two-tower family: one registry from ``model.name`` to a builder.

Every builder has the signature ``build(schema, stats, train, model) -> RetrievalModel``
(``twotower.models.base``); evaluation, the index, the feature store and the export use
only that interface. Adding a model means one module here and one line below (and its
name in ``config.ModelName``). Modules are imported on demand: listing the names does
not load TensorFlow.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

# model name -> module whose ``build`` makes it (a module may build several variants)
REGISTRY: dict[str, str] = {
    "two_tower": "twotower.models.two_tower",
    "dat": "twotower.models.dat",
    "seq_attention": "twotower.models.sequence",
    "seq_gru": "twotower.models.sequence",
    "inttower": "twotower.models.inttower",
}

# models the serving graph (FAISS over one vector per item, searched with one query vector) cannot
# answer for yet: model name -> why
NOT_SERVED: dict[str, str] = {
    "inttower": "its FE score is a sum of maxima over head vectors, not one inner product; "
    "twotower/multi_vector.py retrieves by it in process, the Triton graph does not",
}


class NotServed(ValueError):
    """The index or export stage was asked for a model the serving graph cannot answer for."""


def check_served(name: str) -> None:
    if name in NOT_SERVED:
        raise NotServed(f"model.name={name} is not served yet: {NOT_SERVED[name]}")


def model_names() -> list[str]:
    return list(REGISTRY)


def builder(name: str) -> Callable:
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name]).build

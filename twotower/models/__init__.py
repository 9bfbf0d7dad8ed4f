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

from twotower.config import ConfigError, ModelConfig
from twotower.models.multi_vector import HeadShape

# model name -> module whose ``build`` makes it (a module may build several variants)
REGISTRY: dict[str, str] = {
    "two_tower": "twotower.models.two_tower",
    "dat": "twotower.models.dat",
    "seq_attention": "twotower.models.sequence",
    "seq_gru": "twotower.models.sequence",
    "seq_hstu": "twotower.models.sequence",
    "inttower": "twotower.models.inttower",
    "dcn_v2": "twotower.models.dcn",
}
SEQUENCE_MODELS = ("seq_attention", "seq_gru", "seq_hstu")  # query towers that encode the ordered history
# Models whose score runs a network on each (user, item) pair: no vector index retrieves by it,
# so they serve only as the cascade's pre-ranker (serve.prerank_model)
RANKING_MODELS = ("dcn_v2",)


def head_shape(model: ModelConfig) -> HeadShape | None:
    """How a multi-vector model's vectors split into heads: it is scored by the FE score and
    served through ``multi_vector.HeadIndex``. None for a model scored by one dot product."""
    if model.name != "inttower":
        return None
    fe = model.inttower
    return HeadShape(len(fe.fe_layers), fe.user_heads, fe.item_heads, fe.head_size)


def check_retriever(model: ModelConfig) -> None:
    """Refuse to index or serve a ranking model as the retriever."""
    if model.name in RANKING_MODELS:
        raise ConfigError(
            f"model.name={model.name} is a ranking model: its score runs a network on each (user, item) pair, which no "
            f"vector index can search; serve it as the pre-ranker behind a retriever (serve.prerank_model={model.name})"
        )


def model_names() -> list[str]:
    return list(REGISTRY)


def builder(name: str) -> Callable:
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name]).build

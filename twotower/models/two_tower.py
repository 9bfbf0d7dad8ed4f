"""``two_tower``: MLP towers over the features (the recipe's original model).

Query tower over the USER columns (the history list mean-pooled through the item table),
candidate tower over the ITEM columns; optional field gating (``model.gating``) before
each MLP. With ``gating: none`` and ``loss: softmax`` this is exactly the model the recipe
trained before the family existed, built in the same order so the same seed gives the
same weights.
"""

from __future__ import annotations

import merlin.models.tf as mm
from merlin.schema import Schema, Tags

from twotower.config import ModelConfig, TrainConfig
from twotower.models.base import (
    RetrievalModel,
    TrainingStats,
    check_field_dims,
    compile_model,
    field_inputs,
    share_item_table,
    shared_embeddings,
    tables_for,
    tower,
)
from twotower.models.losses import contrastive_output


def build(schema: Schema, stats: TrainingStats, train: TrainConfig, model: ModelConfig) -> RetrievalModel:
    check_field_dims(train, model)
    schema = share_item_table(schema)
    embeddings = shared_embeddings(schema, train.embedding_dim)
    towers = []
    for tag in (Tags.USER, Tags.ITEM):
        tower_schema = schema.select_by_tag(tag)
        towers.append(tower(field_inputs(tower_schema, tables_for(tower_schema, embeddings), model), train, model))
    query, candidate = towers
    output = contrastive_output(schema, stats.item_counts, stats.catalogue_features, candidate, train, model)
    return compile_model(mm.TwoTowerModelV2(query, candidate, outputs=output), schema, train, model)

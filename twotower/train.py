"""Stage 3: train merlin-models' TwoTowerModelV2 and save its query tower.

Query tower over USER features, candidate tower over ITEM features, in-batch
negatives (optionally mixed with uniformly sampled catalogue items) with an optional
logQ (sampling-bias) correction, L2-normalised outputs and a temperature. Early
stopping watches full-catalogue recall on validation.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

import merlin.io
import merlin.models.tf as mm
from merlin.models.tf.outputs.base import DotProduct
from merlin.models.tf.outputs.sampling.base import Candidate, CandidateSampler
from merlin.models.tf.transforms.bias import PopularityLogitsCorrection
from merlin.schema import Schema, Tags

from twotower.config import TrainConfig
from twotower.evaluate import EvalSet, evaluate_embeddings


def set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    tf.random.set_seed(seed)


@dataclass
class Catalogue:
    """The retrievable items: those in the fitted item vocabulary, in one fixed order."""

    item_ids: np.ndarray  # dataset ids
    features: pd.DataFrame  # encoded item features, rows aligned with item_ids


def item_frequencies(schema: Schema, vocabulary: pd.DataFrame, train_item_ids: pd.Series) -> np.ndarray:
    """Training counts per encoded item id (index = code), floored at 1 for reserved codes."""
    item_id = schema.select_by_tag(Tags.ITEM_ID).first
    counts = np.ones(item_id.int_domain.max + 1, dtype=np.float32)
    train_counts = train_item_ids.value_counts()
    counts[vocabulary.index.to_numpy()] = train_counts.reindex(vocabulary[item_id.name]).fillna(1).to_numpy()
    return counts


def sampling_probabilities(item_counts: np.ndarray, catalogue_codes: np.ndarray, batch_size: int, mixed_negatives: int) -> np.ndarray:
    """Per code, the chance of landing among a batch's negatives: in-batch negatives follow
    training popularity, mixed-in ones are uniform over the catalogue, so logQ uses the mixture."""
    popularity = item_counts / item_counts.sum()
    uniform = np.zeros_like(popularity)
    uniform[catalogue_codes] = 1.0 / len(catalogue_codes)
    return ((batch_size * popularity + mixed_negatives * uniform) / (batch_size + mixed_negatives)).astype(np.float32)


def _feature_tensors(features: pd.DataFrame, schema: Schema) -> dict[str, tf.Tensor | tf.RaggedTensor]:
    """Encoded feature columns as the tensors a tower takes: list columns ragged."""
    tensors = {}
    for column in schema:
        values = features[column.name]
        if column.is_list:
            lengths = values.map(len).to_numpy()
            flat = np.concatenate(values.to_numpy()) if lengths.sum() else np.zeros(0)
            tensors[column.name] = tf.RaggedTensor.from_row_lengths(flat.astype(np.int64), lengths.astype(np.int64))
        else:
            tensors[column.name] = tf.constant(values.to_numpy().astype(np.int64))
    return tensors


class UniformCatalogueSampler(CandidateSampler):
    """Mixed negative sampling (Yang et al. 2020): per batch, ``num_samples`` catalogue items
    drawn uniformly (with replacement) and run through the candidate tower, so rarely seen
    items, which in-batch negatives almost never include, are pushed away too."""

    def __init__(self, catalogue_features: dict, item_id_column: str, candidate_tower: mm.Encoder, num_samples: int, **kwargs):
        super().__init__(max_num_samples=num_samples, **kwargs)
        self.catalogue_features = catalogue_features
        self.item_id_column = item_id_column
        self.catalogue_size = int(catalogue_features[item_id_column].shape[0])
        self.candidate_tower = candidate_tower  # the model's own tower: shared weights, none added

    def add(self, items: Candidate) -> None:
        pass  # nothing to remember: samples come from the fixed catalogue, not from batches

    def call(self, items: Candidate, features=None, targets=None, training=False, testing=False) -> Candidate:
        sampled = self.sample()
        ids = tf.expand_dims(sampled.id, -1) if items.id.shape.rank == 2 else sampled.id
        return Candidate(id=tf.cast(ids, items.id.dtype), metadata=sampled.metadata)

    def sample(self) -> Candidate:
        rows = tf.random.uniform([self.max_num_samples], maxval=self.catalogue_size, dtype=tf.int64)
        # Unknown row count, as in a real batch: the tower concatenates scalar and list
        # columns and refuses a static row count that only some of them have.
        rows = tf.compat.v1.placeholder_with_default(rows, shape=[None])
        sampled = {name: tf.gather(values, rows) for name, values in self.catalogue_features.items()}
        return Candidate(id=sampled[self.item_id_column], metadata={}).with_embedding(self.candidate_tower(sampled))


def share_item_table(schema: Schema, column: str = "history") -> Schema:
    """Point ``column``'s domain at the item id's, so both use one embedding table."""
    if column not in schema.column_names:
        return schema
    item_domain = schema.select_by_tag(Tags.ITEM_ID).first.properties["domain"]
    shared = schema[column].with_properties({**schema[column].properties, "domain": dict(item_domain)})
    return Schema([shared if c.name == column else c for c in schema])


def _tables_for(tower_schema: Schema, embeddings: mm.ParallelBlock) -> mm.ParallelBlock:
    """The tables a tower's categorical columns use, picked by table (domain) name.

    Selecting by tag would drop the shared item table from the query tower: that
    table's own schema is the item id's, tagged ITEM only.
    """
    names = dict.fromkeys(c.int_domain.name or c.name for c in tower_schema.select_by_tag(Tags.CATEGORICAL))
    return mm.ParallelBlock({name: embeddings.parallel_dict[name] for name in names}, schema=tower_schema)


def _tower(schema: Schema, embeddings: mm.Block, config: TrainConfig) -> mm.Encoder:
    inputs = mm.InputBlockV2(schema, categorical=embeddings)
    layers = mm.MLPBlock(config.tower_layers, no_activation_last_layer=True)
    return mm.Encoder(inputs, layers, post=mm.L2Norm() if config.l2_normalize else None)


def build_model(
    schema: Schema, item_counts: np.ndarray, config: TrainConfig, catalogue: Catalogue | None = None
) -> mm.RetrievalModelV2:
    """``catalogue`` is needed only for mixed negatives (``config.mixed_negatives > 0``)."""
    schema = share_item_table(schema)
    # One Embeddings block: tables are keyed by domain name, so history and item_id share one.
    embeddings = mm.Embeddings(schema.select_by_tag(Tags.CATEGORICAL), dim=config.embedding_dim)
    query = _tower(schema.select_by_tag(Tags.USER), _tables_for(schema.select_by_tag(Tags.USER), embeddings), config)
    candidate = _tower(schema.select_by_tag(Tags.ITEM), _tables_for(schema.select_by_tag(Tags.ITEM), embeddings), config)
    samplers: list = ["in-batch"]
    item_probabilities = item_counts / item_counts.sum()
    if config.mixed_negatives:
        if catalogue is None:
            raise ValueError("train.mixed_negatives > 0 needs the catalogue's item features to sample from")
        item_schema = schema.select_by_tag(Tags.ITEM)
        item_id = schema.select_by_tag(Tags.ITEM_ID).first.name
        samplers.append(
            UniformCatalogueSampler(_feature_tensors(catalogue.features, item_schema), item_id, candidate, config.mixed_negatives)
        )
        codes = catalogue.features[item_id].to_numpy()
        item_probabilities = sampling_probabilities(item_counts, codes, config.batch_size, config.mixed_negatives)
    post = None
    if config.logq_correction:
        # ContrastiveOutput divides by the temperature after `post`; scaling the
        # correction by it leaves logits/T - log(q) in the softmax.
        post = PopularityLogitsCorrection(item_probabilities, is_prob_distribution=True, schema=schema, reg_factor=config.temperature)
    output = mm.ContrastiveOutput(
        DotProduct(),
        schema=schema.select_by_tag(Tags.ITEM_ID),
        negative_samplers=samplers,
        logits_temperature=config.temperature,
        store_negative_ids=True,
        post=post,
    )
    model = mm.TwoTowerModelV2(query, candidate, outputs=output)
    model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate), metrics=[])
    return model


def encode(encoder: tf.keras.Model, features: pd.DataFrame, schema: Schema, batch_size: int = 4096) -> np.ndarray:
    """Run a tower over encoded feature rows, in order."""
    dataset = merlin.io.Dataset(features[schema.column_names].reset_index(drop=True), schema=schema)
    loader = mm.Loader(dataset, batch_size=batch_size, shuffle=False)
    return np.concatenate([encoder(batch).numpy() for batch, _ in loader], axis=0)


class FullCatalogueEarlyStopping(tf.keras.callbacks.Callback):
    """Validation metrics over the whole catalogue after each epoch; keeps the best weights."""

    def __init__(
        self,
        eval_set: EvalSet,
        user_features: pd.DataFrame,
        catalogue: Catalogue,
        schema: Schema,
        metric: str,
        patience: int,
    ):
        super().__init__()
        self.eval_set = eval_set
        self.user_features = user_features
        self.catalogue = catalogue
        self.schema = schema
        self.metric = metric
        self.patience = patience
        self.history: list[dict[str, float]] = []
        self.best_value = -np.inf
        self.best_epoch = -1
        self._best_weights = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        train_seconds = time.perf_counter() - self._epoch_start
        metrics = evaluate_towers(self.model, self.eval_set, self.user_features, self.catalogue, self.schema)
        record = {
            "epoch": epoch + 1,
            "loss": float((logs or {}).get("loss", np.nan)),
            "train_seconds": train_seconds,
            **{f"val_{k}": v for k, v in metrics.items()},
        }
        self.history.append(record)
        print(f"  validation {self.metric}={metrics[self.metric]:.4f} recall@10={metrics['recall@10']:.4f}")
        if metrics[self.metric] > self.best_value:
            self.best_value, self.best_epoch = metrics[self.metric], epoch + 1
            self._best_weights = self.model.get_weights()
        elif epoch + 1 - self.best_epoch >= self.patience:
            self.model.stop_training = True

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._best_weights is not None:
            self.model.set_weights(self._best_weights)


def user_vectors_for(model: mm.RetrievalModelV2, user_ids: np.ndarray, user_features: pd.DataFrame, schema: Schema) -> np.ndarray:
    """Query-tower outputs for ``user_ids``; ``user_features`` is indexed by dataset user id."""
    rows = user_features.loc[user_ids]
    return encode(model.query_encoder, rows, schema.select_by_tag(Tags.USER))


def evaluate_towers(
    model: mm.RetrievalModelV2, eval_set: EvalSet, user_features: pd.DataFrame, catalogue: Catalogue, schema: Schema
) -> dict[str, float]:
    users = user_vectors_for(model, eval_set.user_ids, user_features, schema)
    items = encode(model.candidate_encoder, catalogue.features, schema.select_by_tag(Tags.ITEM))
    return evaluate_embeddings(users, items, eval_set)


def train_model(
    train_dataset: merlin.io.Dataset,
    item_counts: np.ndarray,
    config: TrainConfig,
    early_stopping: FullCatalogueEarlyStopping,
    verbose: int = 1,
) -> tuple[mm.RetrievalModelV2, list[dict[str, float]]]:
    """Fit with Keras progress; returns the best epoch's model and per-epoch records."""
    model = build_model(train_dataset.schema, item_counts, config, early_stopping.catalogue)
    loader = mm.Loader(train_dataset, batch_size=config.batch_size, shuffle=True)
    model.fit(loader, epochs=config.epochs, callbacks=[early_stopping], verbose=verbose)
    return model, early_stopping.history


def save_tower(encoder: tf.keras.Model, path: Path) -> None:
    """Save one tower (``model.query_encoder`` or ``model.candidate_encoder``) as a Keras SavedModel."""
    encoder.save(str(path), include_optimizer=False)


def load_tower(path: Path) -> tf.keras.Model:
    """A saved tower as the Keras model it was (merlin.models is imported, so its layers resolve)."""
    return tf.keras.models.load_model(str(path))


def save_item_vectors(catalogue: Catalogue, vectors: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, item_ids=catalogue.item_ids, vectors=vectors.astype(np.float32))


def load_item_vectors(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as saved:
        return saved["item_ids"], saved["vectors"]


def save_history(history: list[dict[str, float]], path: Path) -> None:
    path.write_text(json.dumps(history, indent=2))

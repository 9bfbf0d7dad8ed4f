"""The recipe's default model written again in plain tf.keras: the yardstick of ``make benchmark-train``.

Nothing from Merlin: this is what training the same model costs without merlin-models and
its data loader. It is ``models/two_tower.py`` with the tuned defaults (no gating, softmax
loss, logQ correction, L2-normalised outputs, no mixed negatives), layer for layer:

- one embedding table per categorical domain, ``history`` looking items up in the item id's;
- a list column (history, genres) mean-pooled over its entries, an empty list giving zeros;
- each tower's field embeddings concatenated in column-name order (merlin-models' order, so
  weights carry over one to one), then the MLP (ReLU between layers, none after the last)
  and L2 normalisation;
- in-batch softmax: each row's positive item against every item of the batch, a negative
  that is the row's own item scored out, logits over the temperature minus log q.

Features are NumPy arrays of codes, one per row, or per row a list padded with ``PAD``.
``tests/benchmarks/test_train_benchmark.py`` checks that, given the recipe model's weights, this model
computes the recipe's loss and takes the same training steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import tensorflow as tf

from twotower.config import TrainConfig

PAD = -1  # list entries past a row's length
# The score merlin-models gives an accidental hit (a negative that is the row's own item):
# after the temperature exp() of it is 0, and using the same value keeps the losses equal.
ACCIDENTAL_HIT_SCORE = float(np.finfo(np.float16).min / 100)


@dataclass(frozen=True)
class Layout:
    """Which table each column looks up and which tower it feeds."""

    table_rows: dict[str, int]  # table name -> rows
    tables: dict[str, str]  # column -> its table
    query_columns: tuple[str, ...]
    item_columns: tuple[str, ...]
    item_id: str


def padded_arrays(frame: pd.DataFrame, columns: list[str]) -> dict[str, np.ndarray]:
    """Encoded rows as int32 arrays: a code per row, or for a list column a row per list
    padded with ``PAD`` to the longest one."""
    arrays = {}
    for column in columns:
        values = frame[column].to_numpy()
        if values.dtype != object:
            arrays[column] = values.astype(np.int32)
            continue
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
        padded = np.full((len(values), max(int(lengths.max()), 1)), PAD, dtype=np.int32)
        padded[np.arange(padded.shape[1]) < lengths[:, None]] = np.concatenate(values)  # row by row, as the lists run
        arrays[column] = padded
    return arrays


def _mlp(layers: list[int]) -> tf.keras.Sequential:
    *hidden, last = layers
    return tf.keras.Sequential(
        [*(tf.keras.layers.Dense(units, activation="relu") for units in hidden), tf.keras.layers.Dense(last)]
    )


class PlainTwoTower(tf.keras.Model):
    """Query and item towers over shared tables, trained by the in-batch softmax with logQ."""

    def __init__(self, layout: Layout, train: TrainConfig, item_log_q: np.ndarray):
        super().__init__(name="plain_two_tower")
        self.layout = layout
        self.tables = {
            name: tf.keras.layers.Embedding(rows, train.embedding_dim, name=f"{name}_table")
            for name, rows in layout.table_rows.items()
        }
        self.query_mlp, self.item_mlp = _mlp(train.tower_layers), _mlp(train.tower_layers)
        self.temperature = train.temperature
        self.item_log_q = tf.constant(item_log_q, tf.float32)  # log of each item's share of the training positives

    def field(self, features: dict[str, tf.Tensor], column: str) -> tf.Tensor:
        codes, table = features[column], self.tables[self.layout.tables[column]]
        if codes.shape.rank == 1:
            return table(codes)
        present = tf.cast(codes != PAD, tf.float32)[..., None]
        summed = tf.reduce_sum(table(tf.maximum(codes, 0)) * present, axis=1)
        return summed / tf.maximum(tf.reduce_sum(present, axis=1), 1.0)

    def tower(self, features: dict[str, tf.Tensor], columns: tuple[str, ...], mlp: tf.keras.Sequential) -> tf.Tensor:
        fields = tf.concat([self.field(features, column) for column in sorted(columns)], axis=-1)
        return tf.math.l2_normalize(mlp(fields), axis=-1, epsilon=1e-12)

    def call(self, features: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        return self.tower(features, self.layout.query_columns, self.query_mlp), self.tower(
            features, self.layout.item_columns, self.item_mlp
        )

    def in_batch_loss(self, features: dict[str, tf.Tensor]) -> tf.Tensor:
        query, item = self(features)
        item_ids = features[self.layout.item_id]
        scores = tf.matmul(query, item, transpose_b=True)  # row: a query; column: the batch's items
        log_q = tf.gather(self.item_log_q, item_ids)
        positive = tf.linalg.diag_part(scores)[:, None] / self.temperature - log_q[:, None]
        accidental_hit = tf.equal(item_ids[:, None], item_ids[None, :])
        negatives = tf.where(accidental_hit, ACCIDENTAL_HIT_SCORE, scores) / self.temperature - log_q[None, :]
        logits = tf.concat([positive, negatives], axis=1)  # the positive is class 0
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.zeros_like(item_ids), logits))

    def train_step(self, features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        with tf.GradientTape() as tape:
            loss = self.in_batch_loss(features)
        self.optimizer.minimize(loss, self.trainable_variables, tape=tape)
        return {"loss": loss}


def build_plain_model(layout: Layout, train: TrainConfig, item_log_q: np.ndarray) -> PlainTwoTower:
    """The model compiled with the recipe's optimizer and learning rate."""
    model = PlainTwoTower(layout, train, item_log_q)
    model.compile(optimizer=tf.keras.optimizers.Adam(train.learning_rate))
    return model

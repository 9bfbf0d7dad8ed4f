"""Learning approaches, each usable with any model of the family.

Every model ends in merlin-models' ``ContrastiveOutput``: for each training positive it
scores the positive item and a set of negatives (the other positives of the batch,
optionally plus items drawn uniformly from the catalogue), divides by the temperature and
gives ``logits`` [batch, 1 + negatives] with a one-hot ``y_true`` marking the positive.
The approaches differ only in the loss over those logits:

- ``softmax``: contrastive, categorical cross-entropy over positive + negatives, with the
  logQ correction for how often each negative is sampled (today's default);
- ``bpr``: pairwise, -log sigmoid(s_pos - s_neg) averaged over the row's negatives;
- ``bce``: pointwise, sigmoid cross-entropy of the positive against label 1 plus the
  mean over negatives against label 0.

The logQ correction is derived for the sampled softmax (it makes the sampled partition
function unbiased), so it is applied to ``softmax`` only; ``bpr`` and ``bce`` see the
negatives as drawn.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import merlin.models.tf as mm
import numpy as np
import pandas as pd
import tensorflow as tf
from merlin.models.tf.outputs.base import DotProduct
from merlin.models.tf.outputs.sampling.base import Candidate, CandidateSampler
from merlin.models.tf.transforms.bias import PopularityLogitsCorrection
from merlin.schema import Schema, Tags

from twotower.config import ModelConfig, TrainConfig


def _positive_and_negatives(y_true: tf.Tensor, logits: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Per row: the positive's logit [batch, 1] and a 0/1 mask of the negatives."""
    y_true = tf.cast(y_true, logits.dtype)
    return tf.reduce_sum(y_true * logits, axis=1, keepdims=True), 1.0 - y_true


class SoftmaxLoss(tf.keras.losses.Loss):
    """Categorical cross-entropy over the positive and its negatives."""

    def call(self, y_true, y_pred):
        return tf.nn.softmax_cross_entropy_with_logits(tf.cast(y_true, y_pred.dtype), y_pred)


class BPRLoss(tf.keras.losses.Loss):
    """Bayesian personalised ranking: mean over the row's negatives of -log sigmoid(s+ - s-)."""

    def call(self, y_true, y_pred):
        positive, negatives = _positive_and_negatives(y_true, y_pred)
        pairwise = tf.math.softplus(-(positive - y_pred))  # -log sigmoid(x) = softplus(-x)
        return tf.reduce_sum(pairwise * negatives, axis=1) / tf.maximum(tf.reduce_sum(negatives, axis=1), 1.0)


class BCELoss(tf.keras.losses.Loss):
    """Pointwise: the positive against label 1 plus the mean of the negatives against 0."""

    def call(self, y_true, y_pred):
        positive, negatives = _positive_and_negatives(y_true, y_pred)
        positive_term = tf.math.softplus(-positive[:, 0])  # -log sigmoid(s+)
        negative_terms = tf.math.softplus(y_pred) * negatives  # -log(1 - sigmoid(s-))
        return positive_term + tf.reduce_sum(negative_terms, axis=1) / tf.maximum(tf.reduce_sum(negatives, axis=1), 1.0)


LOSSES = {"softmax": SoftmaxLoss, "bpr": BPRLoss, "bce": BCELoss}


def loss_for(name: str) -> tf.keras.losses.Loss:
    return LOSSES[name](name=f"{name}_loss")


def sampling_probabilities(
    item_counts: np.ndarray, catalogue_codes: np.ndarray, batch_size: int, mixed_negatives: int
) -> np.ndarray:
    """Per code, the chance of landing among a batch's negatives: in-batch negatives follow
    training popularity, mixed-in ones are uniform over the catalogue, so logQ uses the mixture."""
    popularity = item_counts / item_counts.sum()
    uniform = np.zeros_like(popularity)
    uniform[catalogue_codes] = 1.0 / len(catalogue_codes)
    return ((batch_size * popularity + mixed_negatives * uniform) / (batch_size + mixed_negatives)).astype(np.float32)


def feature_tensors(features: pd.DataFrame, schema: Schema) -> dict[str, tf.Tensor | tf.RaggedTensor]:
    """Encoded feature columns as the tensors a tower takes: list columns ragged."""
    tensors = {}
    for column in schema:
        values = features[column.name]
        if column.is_list:
            lengths = values.map(len).to_numpy()
            flat = np.concatenate(values.to_numpy()) if lengths.sum() else np.zeros(0)
            tensors[column.name] = tf.RaggedTensor.from_row_lengths(flat.astype(np.int64), lengths.astype(np.int64))
        else:  # categorical codes, or normalised continuous values
            tensors[column.name] = tf.constant(
                values.to_numpy().astype(np.float32 if np.dtype(column.dtype.to_numpy).kind == "f" else np.int64)
            )
    return tensors


class UniformCatalogueSampler(CandidateSampler):
    """Mixed negative sampling (Yang et al. 2020): per batch, ``num_samples`` catalogue items
    drawn uniformly (with replacement) and run through the candidate tower, so rarely seen
    items, which in-batch negatives almost never include, are pushed away too."""

    def __init__(
        self, catalogue_features: dict, item_id_column: str, candidate_tower: mm.Encoder, num_samples: int, **kwargs
    ):
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


def contrastive_output(
    schema: Schema,
    item_counts: np.ndarray,
    catalogue_features: pd.DataFrame,
    candidate: mm.Encoder,
    train: TrainConfig,
    model: ModelConfig,
    make_output: Callable[..., mm.ContrastiveOutput] | None = None,
) -> mm.ContrastiveOutput:
    """Scores of each positive and its negatives (in-batch, plus ``train.mixed_negatives``
    uniform catalogue items), over the temperature, logQ-corrected for ``softmax``. The scores are
    dot products unless ``make_output`` (called with the output's settings) scores otherwise."""
    samplers: list = ["in-batch"]
    item_probabilities = item_counts / item_counts.sum()
    if train.mixed_negatives:
        item_schema = schema.select_by_tag(Tags.ITEM)
        item_id = schema.select_by_tag(Tags.ITEM_ID).first.name
        samplers.append(
            UniformCatalogueSampler(
                feature_tensors(catalogue_features, item_schema), item_id, candidate, train.mixed_negatives
            )
        )
        codes = catalogue_features[item_id].to_numpy()
        item_probabilities = sampling_probabilities(item_counts, codes, train.batch_size, train.mixed_negatives)
    post = None
    if train.logq_correction and model.loss == "softmax":
        # ContrastiveOutput divides by the temperature after `post`; scaling the
        # correction by it leaves logits/T - log(q) in the softmax.
        post = PopularityLogitsCorrection(
            item_probabilities, is_prob_distribution=True, schema=schema, reg_factor=train.temperature
        )
    return (make_output or functools.partial(mm.ContrastiveOutput, DotProduct()))(
        schema=schema.select_by_tag(Tags.ITEM_ID),
        negative_samplers=samplers,
        logits_temperature=train.temperature,
        store_negative_ids=True,
        post=post,
    )

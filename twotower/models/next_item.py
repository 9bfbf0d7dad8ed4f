"""Next-item training over whole sequences (the SASRec objective).

A user's ordered history is encoded once per step by a causal encoder of the family
(``twotower.models.sequence.history_encoder``), and the output at every position is trained
to score the item that came next above a set of negatives. One pass over a history of n
items yields n training positions, so the cost of an epoch grows linearly with the history
length, where encoding each training row's prefix again grows with its square.

Queries and items are L2-normalised and compared by dot product over a temperature (cosine
similarity, as generative-recommenders trains SASRec and HSTU). Negatives are uniform draws
from the catalogue (a set per sequence, shared by its positions), draws from the batch's own
targets (shared by every position), or both, with the logQ correction on every logit; a negative
equal to the position's target is masked. The recipe's losses (softmax, BPR, BCE) take the logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from twotower.models.losses import loss_for

MASKED = -1e9  # a logit no softmax weighs: a negative that is the target itself


@tf.keras.utils.register_keras_serializable(package="twotower")
class CausalMeanPool(tf.keras.layers.Layer):
    """Position i: the mean of positions <= i (``two_tower``'s mean-pooled history, at every step)."""

    def call(self, sequence: tf.Tensor, mask: tf.Tensor, training=False) -> tf.Tensor:
        valid = tf.cast(mask, sequence.dtype)[..., None]
        counts = tf.maximum(tf.cumsum(valid, axis=1), 1.0)
        return tf.cumsum(sequence * valid, axis=1) / counts * valid


class NextItemModel(tf.keras.Model):
    """Item ids (code 0 pads, 1..items are the catalogue) -> a normalised query per position.

    The item table embeds both the history and the candidates, as in SASRec; ``head`` (an MLP,
    for the mean-pooled tower) runs after the encoder."""

    def __init__(
        self,
        items: int,
        dim: int,
        encoder: tf.keras.layers.Layer,
        head: tf.keras.layers.Layer | None = None,
        dropout: float = 0.2,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.items, self.dim = items, dim
        self.item_table = tf.keras.layers.Embedding(
            items + 1, dim, embeddings_initializer=tf.keras.initializers.TruncatedNormal(stddev=0.02), name="items"
        )
        self.encoder, self.head = encoder, head
        self.drop = tf.keras.layers.Dropout(dropout)

    def call(self, history: tf.Tensor, timestamps: tf.Tensor | None = None, training=False) -> tf.Tensor:
        """[batch, length] item codes (0 after each history's end) -> [batch, length, dim] queries."""
        mask = history > 0
        embedded = self.drop(self.item_table(history) * math.sqrt(self.dim), training=training)
        if getattr(self.encoder, "uses_time", False) and timestamps is not None:
            hidden = self.encoder(embedded, mask, training=training, timestamps=timestamps)
        else:
            hidden = self.encoder(embedded, mask, training=training)
        if self.head is not None:
            hidden = self.head(hidden, training=training)
        return tf.math.l2_normalize(hidden, axis=-1)

    def item_vectors(self, codes: tf.Tensor | None = None) -> tf.Tensor:
        """Normalised vectors of item ``codes`` (every catalogue item, codes 1..items, by default)."""
        table = self.item_table.embeddings
        vectors = table[1:] if codes is None else tf.gather(table, codes)
        return tf.math.l2_normalize(vectors, axis=-1)


def next_item_logits(
    queries: tf.Tensor,
    targets: tf.Tensor,
    item_vectors: tf.Tensor,
    sequence_negatives: tf.Tensor | None,
    shared_negatives: tf.Tensor | None,
    temperature: float,
    log_q: tf.Tensor | None = None,
) -> tf.Tensor:
    """Logits [batch, length, 1 + negatives]: the target first, then each negative.

    ``queries`` [batch, length, dim]; ``targets`` [batch, length] codes; ``item_vectors`` the
    normalised table (row = code); ``sequence_negatives`` [batch, n] codes shared by a sequence's
    positions; ``shared_negatives`` [m] codes shared by the batch. ``log_q`` (per code: the log of
    its expected count among the negatives) is subtracted from every logit, the target's too, as the
    sampled softmax's correction asks (Yi et al., RecSys 2019)."""

    def corrected(scores, codes):
        return scores if log_q is None else scores - temperature * tf.gather(log_q, codes)

    positive = tf.reduce_sum(queries * tf.gather(item_vectors, targets), axis=-1)
    parts = [corrected(positive, targets)[..., None]]
    if sequence_negatives is not None:
        scores = tf.einsum("bld,bnd->bln", queries, tf.gather(item_vectors, sequence_negatives))
        scores = corrected(scores, sequence_negatives[:, None, :])
        hit = tf.equal(sequence_negatives[:, None, :], targets[..., None])
        parts.append(tf.where(hit, MASKED * temperature, scores))
    if shared_negatives is not None:
        scores = tf.einsum("bld,md->blm", queries, tf.gather(item_vectors, shared_negatives))
        scores = corrected(scores, shared_negatives[None, None, :])
        hit = tf.equal(shared_negatives[None, None, :], targets[..., None])
        parts.append(tf.where(hit, MASKED * temperature, scores))
    return tf.concat(parts, axis=-1) / temperature


# A batch as a trainer's ``encode`` gives it: queries [batch, length, dim], the item code each
# position must predict [batch, length], and which positions are real [batch, length].
EncodedBatch = tuple[tf.Tensor, tf.Tensor, tf.Tensor]


class NextItemTrainer:
    """Fits towers on whole histories: every valid position of a batch predicts its next item.

    ``encode(batch, training)`` runs the query side over a batch of histories; ``item_vectors(training)``
    gives the normalised vector of every item code (rows of codes no one retrieves are never read);
    ``variables`` are what is trained. Negatives: ``uniform_negatives`` codes drawn per sequence from
    ``candidate_codes`` (shared by its positions), and ``in_batch_negatives`` targets drawn from the
    batch's own (so in proportion to popularity), shared by every position, with the logQ correction
    (``item_counts``: training targets per code) when ``logq_correction``."""

    def __init__(
        self,
        encode: Callable[..., EncodedBatch],
        item_vectors: Callable[[bool], tf.Tensor],
        variables: Callable[[], list[tf.Variable]],
        candidate_codes: np.ndarray,
        item_counts: np.ndarray,
        loss: str = "softmax",
        uniform_negatives: int = 128,
        in_batch_negatives: int = 0,
        logq_correction: bool = True,
        temperature: float = 0.05,
        learning_rate: float = 1e-3,
    ):
        if uniform_negatives <= 0 and in_batch_negatives <= 0:
            raise ValueError("next-item training needs negatives: uniform draws, in-batch targets or both")
        self.encode, self.item_vectors, self.variables = encode, item_vectors, variables
        self.candidate_codes = tf.constant(candidate_codes, tf.int32)
        self.uniform_negatives, self.in_batch_negatives = uniform_negatives, in_batch_negatives
        self.temperature = temperature
        self.loss = loss_for(loss)
        self.optimizer = tf.keras.optimizers.Adam(learning_rate)
        self.log_q = None
        if logq_correction:
            # Expected count of each code among a step's negatives: in-batch draws follow the targets'
            # popularity, uniform draws are spread over the candidates.
            popularity = np.maximum(item_counts.astype(np.float64), 1.0) / max(float(item_counts.sum()), 1.0)
            uniform = np.zeros_like(popularity)
            uniform[candidate_codes] = uniform_negatives / len(candidate_codes)
            self.log_q = tf.constant(np.log(in_batch_negatives * popularity + uniform + 1e-12), tf.float32)
        self.step = tf.function(self._step, reduce_retracing=True)

    @classmethod
    def for_model(cls, model: NextItemModel, item_counts: np.ndarray, **settings) -> NextItemTrainer:
        """A trainer of ``model`` on batches of (codes, timestamps) [batch, length + 1], 0 after the end."""

        def encode(batch, training):
            sequences, timestamps = batch
            queries = model(sequences[:, :-1], timestamps[:, :-1], training=training)
            targets = sequences[:, 1:]
            return queries, targets, targets > 0

        return cls(
            encode,
            lambda training: model.item_vectors(tf.range(model.items + 1)),
            lambda: model.trainable_variables,
            np.arange(1, model.items + 1),
            item_counts,
            **settings,
        )

    def _negatives(self, targets: tf.Tensor, valid: tf.Tensor):
        batch = tf.shape(targets)[0]
        sequence_negatives = shared = None
        if self.uniform_negatives > 0:
            drawn = tf.random.uniform([batch, self.uniform_negatives], 0, tf.size(self.candidate_codes), tf.int32)
            sequence_negatives = tf.gather(self.candidate_codes, drawn)
        if self.in_batch_negatives > 0:
            positives = tf.boolean_mask(targets, valid)
            drawn = tf.random.uniform([self.in_batch_negatives], 0, tf.maximum(tf.size(positives), 1), tf.int32)
            shared = tf.gather(positives, tf.minimum(drawn, tf.size(positives) - 1))
        return sequence_negatives, shared

    def logits_and_labels(self, batch, training: bool) -> tuple[tf.Tensor, tf.Tensor]:
        """Logits [positions, 1 + negatives] of the batch's valid positions, and their one-hot labels."""
        queries, targets, valid = self.encode(batch, training)
        logits = next_item_logits(
            queries,
            targets,
            self.item_vectors(training),
            *self._negatives(targets, valid),
            self.temperature,
            self.log_q,
        )
        logits = tf.boolean_mask(logits, valid)
        labels = tf.one_hot(tf.zeros(tf.shape(logits)[0], tf.int32), tf.shape(logits)[1])
        return logits, labels

    def _step(self, batch) -> tf.Tensor:
        with tf.GradientTape() as tape:
            logits, labels = self.logits_and_labels(batch, training=True)
            loss = tf.reduce_mean(self.loss(labels, logits))
        variables = self.variables()
        gradients = tape.gradient(loss, variables)
        self.optimizer.apply_gradients((g, v) for g, v in zip(gradients, variables) if g is not None)
        return loss

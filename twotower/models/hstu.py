"""HSTU, the history encoder of ``seq_hstu`` (Zhai et al., "Actions Speak Louder than Words",
ICML 2024; Meta's generative-recommenders).

Each block of the Hierarchical Sequential Transduction Unit replaces the transformer's softmax
attention and feed-forward layer with one gated, pointwise step:

    U, V, Q, K = SiLU(LayerNorm(X) W_uvqk)
    A = SiLU(Q K^T + b_position(i - j) + b_time(bucket(t_i - t_j))) / n     (causal: j <= i)
    X = X + W_o Dropout(LayerNorm(A V) * U)

SiLU instead of softmax keeps how strongly a user engaged (the weights need not sum to one),
divided by ``n`` (the longest history the tower takes, as the official code divides by its
padded length, so that padding never changes an output). The relative biases are learned per
block: one weight per distance i - j, and one per log-spaced bucket of the time between two
events when timestamps are given.
"""

from __future__ import annotations

import tensorflow as tf

# generative-recommenders buckets time gaps as floor(ln(max(|gap|, 1)) / 0.301): about one bucket
# per doubling of the gap in seconds.
TIME_BUCKET_WIDTH = 0.301


def time_buckets(timestamps: tf.Tensor, buckets: int) -> tf.Tensor:
    """[batch, length] timestamps (seconds) -> [batch, length, length] bucket of |t_i - t_j|."""
    gaps = tf.abs(tf.cast(timestamps[:, :, None] - timestamps[:, None, :], tf.float32))
    bucket = tf.floor(tf.math.log(tf.maximum(gaps, 1.0)) / TIME_BUCKET_WIDTH)
    return tf.cast(tf.clip_by_value(bucket, 0.0, float(buckets)), tf.int32)


@tf.keras.utils.register_keras_serializable(package="twotower")
class HSTUEncoder(tf.keras.layers.Layer):
    """HSTU blocks over a history: [batch, length, dim] and its mask -> [batch, length, dim],
    position i reading positions j <= i only."""

    uses_time = True  # callers pass ``timestamps`` when the data has them

    def __init__(
        self, max_length: int, heads: int = 1, blocks: int = 2, dropout: float = 0.2, buckets: int = 128, **kwargs
    ):
        super().__init__(**kwargs)
        self.max_length, self.heads, self.blocks, self.dropout, self.buckets = (
            max_length,
            heads,
            blocks,
            dropout,
            buckets,
        )

    def build(self, input_shape):
        dim = int(input_shape[-1])
        self.head_dim = max(1, dim // self.heads)
        width = self.heads * self.head_dim
        self.input_norms = [tf.keras.layers.LayerNormalization(name=f"input_norm_{i}") for i in range(self.blocks)]
        self.uvqk = [tf.keras.layers.Dense(4 * width, name=f"uvqk_{i}") for i in range(self.blocks)]
        self.output_norms = [tf.keras.layers.LayerNormalization(name=f"output_norm_{i}") for i in range(self.blocks)]
        self.projections = [tf.keras.layers.Dense(dim, name=f"output_{i}") for i in range(self.blocks)]
        self.position_bias = [
            self.add_weight(name=f"position_bias_{i}", shape=[self.max_length], initializer="zeros")
            for i in range(self.blocks)
        ]
        self.time_bias = [
            self.add_weight(name=f"time_bias_{i}", shape=[self.buckets + 1], initializer="zeros")
            for i in range(self.blocks)
        ]
        self.drop = tf.keras.layers.Dropout(self.dropout)
        super().build(input_shape)

    def call(self, sequence: tf.Tensor, mask: tf.Tensor, training=False, timestamps: tf.Tensor | None = None):
        batch, length = tf.shape(sequence)[0], tf.shape(sequence)[1]
        positions = tf.range(length)
        distance = positions[:, None] - positions[None, :]  # [i, j] = i - j
        attend = tf.logical_and((distance >= 0)[None], tf.logical_and(mask[:, None, :], mask[:, :, None]))
        attend = tf.cast(attend, sequence.dtype)[:, None]  # [batch, 1 (heads), i, j]
        distance = tf.clip_by_value(distance, 0, self.max_length - 1)
        gaps = None if timestamps is None else time_buckets(timestamps, self.buckets)
        hidden = sequence
        for block in range(self.blocks):
            u, v, q, k = tf.split(tf.nn.silu(self.uvqk[block](self.input_norms[block](hidden))), 4, axis=-1)
            q, k, v = (tf.reshape(x, [batch, length, self.heads, self.head_dim]) for x in (q, k, v))
            scores = tf.einsum("bihd,bjhd->bhij", q, k) + tf.gather(self.position_bias[block], distance)
            if gaps is not None:
                scores += tf.gather(self.time_bias[block], gaps)[:, None]
            weights = tf.nn.silu(scores) * attend / self.max_length
            attended = tf.reshape(tf.einsum("bhij,bjhd->bihd", weights, v), [batch, length, self.heads * self.head_dim])
            gated = self.output_norms[block](attended) * u
            hidden = hidden + self.projections[block](self.drop(gated, training=training))
        return hidden * tf.cast(mask, hidden.dtype)[..., None]

    def get_config(self):
        return {
            **super().get_config(),
            "max_length": self.max_length,
            "heads": self.heads,
            "blocks": self.blocks,
            "dropout": self.dropout,
            "buckets": self.buckets,
        }

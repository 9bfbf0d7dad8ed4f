"""IntTower's interaction mechanisms (Li et al., CIKM 2022) as Keras pieces.

IntTower keeps two towers but lets them interact more than a single dot product does:

- Light-SE gates each tower's field embeddings before its MLP (``gating.LightSE``; not
  repeated here);
- the FE-Block ("fine-grained and early feature interaction"): the output of each chosen
  user-tower layer is projected into ``user_heads`` head vectors of ``head_size``, the item
  tower's last output into ``item_heads`` head vectors of the same size, and the score is
  the sum over user layers and user heads of the best-matching item head:
  ``sum_l sum_h max_k <u_{l,h}, v_k>``. Item heads only depend on the item, user heads only
  on the user, so both sides can still be cached; the max over item heads is the only
  per-pair work;
- CIR (contrastive interaction regularisation): an InfoNCE loss that pulls a user's FE
  representation towards its positive item's and away from the other items of the batch.

Differences from the official PyTorch code (github.com/archersama/IntTower), on purpose:

- the official ``User_Fe_DNN`` projects each layer's *input* (the embedding input and the
  first two hidden outputs); the paper, and this module, project each layer's *output*
  (which layers take part is ``model.inttower.fe_layers``);
- at its HEAD the official CIR (``contrast_loss``) takes the 0/1 click label as the index
  of the target column and its last commit removed it from the total loss; an older version
  used ``mean(u.v) - mean(u.v.y)``. ``contrastive_interaction_loss`` is written as the paper
  describes it: for each positive (user, item) row, softmax cross-entropy of that row's
  item against every item of the batch, on L2-normalised representations over a
  temperature.
"""

from __future__ import annotations

import tensorflow as tf


def fe_score(user_heads: list[tf.Tensor], item_heads: tf.Tensor) -> tf.Tensor:
    """``sum_l sum_h max_k <user_heads[l][:, h], item_heads[:, k]>`` per row: [batch].

    ``user_heads``: one [batch, user heads, size] tensor per user layer taking part;
    ``item_heads``: [batch, item heads, size].
    """
    total = tf.zeros(tf.shape(item_heads)[:1], dtype=item_heads.dtype)
    for heads in user_heads:
        similarities = tf.einsum("bhd,bkd->bhk", heads, item_heads)  # every user head against every item head
        total += tf.reduce_sum(tf.reduce_max(similarities, axis=-1), axis=-1)
    return total


@tf.keras.utils.register_keras_serializable(package="twotower")
class FEBlock(tf.keras.layers.Layer):
    """Projects ``user_layers`` user-layer outputs and the item tower's last output into heads;
    calling it gives the FE score [batch]. ``heads`` gives the projections themselves (CIR uses them)."""

    def __init__(self, user_layers: int, user_heads: int = 32, item_heads: int = 32, head_size: int = 64, **kwargs):
        super().__init__(**kwargs)
        self.user_layers, self.user_heads, self.item_heads, self.head_size = user_layers, user_heads, item_heads, head_size
        self.user_projections = [
            tf.keras.layers.Dense(user_heads * head_size, name=f"user_layer_{number}_heads") for number in range(user_layers)
        ]
        self.item_projection = tf.keras.layers.Dense(item_heads * head_size, name="item_heads")

    def heads(self, user_outputs: list[tf.Tensor], item_output: tf.Tensor) -> tuple[list[tf.Tensor], tf.Tensor]:
        """[batch, user heads, size] per user layer, and [batch, item heads, size]."""
        user = [tf.reshape(project(output), [-1, self.user_heads, self.head_size]) for project, output in zip(self.user_projections, user_outputs)]
        return user, tf.reshape(self.item_projection(item_output), [-1, self.item_heads, self.head_size])

    def call(self, inputs):
        user_outputs, item_output = inputs
        return fe_score(*self.heads(list(user_outputs), item_output))

    def get_config(self):
        return {**super().get_config(), "user_layers": self.user_layers, "user_heads": self.user_heads, "item_heads": self.item_heads, "head_size": self.head_size}


def contrastive_interaction_loss(user: tf.Tensor, item: tf.Tensor, positive: tf.Tensor, temperature: float) -> tf.Tensor:
    """CIR per row [batch]: InfoNCE of the row's own item among the batch's items, for rows
    whose label is positive (0 elsewhere).

    ``user`` and ``item`` are [batch, ...] representations (flattened, then L2-normalised);
    row i's logits are ``cos(u_i, v_j) / temperature`` over every row j of the batch, its
    target j = i: the other rows' items are the negatives.
    """
    batch = tf.shape(user)[0]
    user = tf.math.l2_normalize(tf.reshape(user, [batch, -1]), axis=-1)
    item = tf.math.l2_normalize(tf.reshape(item, [batch, -1]), axis=-1)
    logits = tf.matmul(user, item, transpose_b=True) / temperature
    per_row = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.range(batch), logits=logits)
    return per_row * tf.cast(tf.reshape(positive, [-1]) > 0.5, per_row.dtype)

"""Field gating inside a tower: SENet (Hu et al. 2018) and IntTower's Light-SE.

Both take a tower's field embeddings [batch, fields, dim] (one embedding per feature; list
features mean-pooled), squeeze each field to its mean over the embedding dimension, learn
one weight per field from those means and rescale the fields before the tower's MLP.
"""

from __future__ import annotations

import tensorflow as tf

from twotower.config import ModelConfig


@tf.keras.utils.register_keras_serializable(package="twotower")
class SENet(tf.keras.layers.Layer):
    """Squeeze (mean over dim), excite (fields -> fields // reduction, ReLU -> fields,
    sigmoid), rescale: ``x * a``."""

    def __init__(self, reduction: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.reduction = reduction

    def build(self, input_shape):
        fields = int(input_shape[1])
        self.squeeze_layer = tf.keras.layers.Dense(max(1, fields // self.reduction), activation="relu", name="squeeze")
        self.excite_layer = tf.keras.layers.Dense(fields, activation="sigmoid", name="excite")
        super().build(input_shape)

    def field_weights(self, fields: tf.Tensor) -> tf.Tensor:
        return self.excite_layer(self.squeeze_layer(tf.reduce_mean(fields, axis=-1)))

    def compute_output_shape(self, input_shape):
        return input_shape

    def call(self, fields):
        return fields * self.field_weights(fields)[..., None]

    def get_config(self):
        return {**super().get_config(), "reduction": self.reduction}


@tf.keras.utils.register_keras_serializable(package="twotower")
class LightSE(tf.keras.layers.Layer):
    """IntTower's Light-SE: one bias-free fields -> fields layer over the squeezed means,
    softmax over fields, residual rescale ``x + x * a``."""

    def build(self, input_shape):
        fields = int(input_shape[1])
        self.excite_layer = tf.keras.layers.Dense(fields, use_bias=False, name="excite")
        super().build(input_shape)

    def field_weights(self, fields: tf.Tensor) -> tf.Tensor:
        return tf.nn.softmax(self.excite_layer(tf.reduce_mean(fields, axis=-1)), axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def call(self, fields):
        return fields + fields * self.field_weights(fields)[..., None]


@tf.keras.utils.register_keras_serializable(package="twotower")
class FieldGate(tf.keras.layers.Layer):
    """A tower's field embeddings (a dict name -> [batch, dim]) stacked in name order,
    gated, and flattened to [batch, fields * dim] for the MLP."""

    def __init__(self, gate: tf.keras.layers.Layer, **kwargs):
        super().__init__(**kwargs)
        self.gate = gate

    def compute_output_shape(self, input_shape):
        shapes = list(input_shape.values())
        return tf.TensorShape([shapes[0][0], sum(int(shape[-1]) for shape in shapes)])

    def call(self, inputs):
        fields = tf.stack([inputs[name] for name in sorted(inputs)], axis=1)
        gated = self.gate(fields)
        return tf.reshape(gated, [-1, gated.shape[1] * gated.shape[2]])

    def get_config(self):
        return {**super().get_config(), "gate": tf.keras.layers.serialize(self.gate)}

    @classmethod
    def from_config(cls, config):
        return cls(tf.keras.layers.deserialize(config.pop("gate")), **config)


def field_gate(model: ModelConfig) -> FieldGate:
    gate = SENet(model.senet_reduction) if model.gating == "senet" else LightSE()
    return FieldGate(gate)

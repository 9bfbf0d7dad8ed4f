"""HSTU's blocks against NumPy, and next-item training over whole sequences: one pass gives every
position the query its own prefix gives, the logits by hand, and a learnable order learned."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from twotower.models.hstu import HSTUEncoder
from twotower.models.next_item import CausalMeanPool, NextItemModel, NextItemTrainer, next_item_logits
from twotower.models.sequence import CausalSelfAttention

pytestmark = pytest.mark.smoke


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _layer_norm(x, norm):
    mean, variance = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + norm.epsilon) * norm.gamma.numpy() + norm.beta.numpy()


def _hstu_numpy(layer: HSTUEncoder, x, mask, timestamps):
    """HSTU as the paper writes it, one (user, head, i, j) at a time where it matters."""
    batch, length, _ = x.shape
    heads, head_dim = layer.heads, layer.head_dim
    for block in range(layer.blocks):
        kernel, bias = (w.numpy() for w in layer.uvqk[block].weights)
        u, v, q, k = np.split(_silu(_layer_norm(x, layer.input_norms[block]) @ kernel + bias), 4, axis=-1)
        position_bias, time_bias = layer.position_bias[block].numpy(), layer.time_bias[block].numpy()
        attended = np.zeros((batch, length, heads, head_dim))
        for b in range(batch):
            for h in range(heads):
                part = slice(h * head_dim, (h + 1) * head_dim)
                for i in range(length):
                    for j in range(i + 1):  # causal: j <= i
                        if not (mask[b, i] and mask[b, j]):
                            continue
                        gap = abs(int(timestamps[b, i]) - int(timestamps[b, j]))
                        bucket = min(int(np.floor(np.log(max(gap, 1)) / 0.301)), layer.buckets)
                        score = q[b, i, part] @ k[b, j, part] + position_bias[min(i - j, layer.max_length - 1)]
                        weight = _silu(score + time_bias[bucket]) / layer.max_length
                        attended[b, i, h] += weight * v[b, j, part]
        gated = _layer_norm(attended.reshape(batch, length, -1), layer.output_norms[block]) * u
        out_kernel, out_bias = (w.numpy() for w in layer.projections[block].weights)
        x = x + gated @ out_kernel + out_bias
    return x * mask[..., None]


def _hstu(max_length=6, heads=2, blocks=2, seed=0, dim=8):
    layer = HSTUEncoder(max_length, heads=heads, blocks=blocks, dropout=0.0, buckets=64)
    layer.build(tf.TensorShape([None, None, dim]))
    rng = np.random.default_rng(seed)
    for weights in (*layer.position_bias, *layer.time_bias):  # zeros at start: make them matter
        weights.assign(rng.normal(size=weights.shape))
    return layer


def _inputs(seed=1, length=6):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, length, 8)).astype(np.float32)
    mask = np.ones((2, length), bool)
    mask[1, 4:] = False  # a shorter history, padded
    timestamps = np.cumsum(rng.integers(0, 100_000, size=(2, length)), axis=1).astype(np.int64)
    return x, mask, timestamps


def test_hstu_matches_numpy_with_its_position_and_time_bias():
    layer, (x, mask, timestamps) = _hstu(), _inputs()
    out = layer(tf.constant(x), tf.constant(mask), timestamps=tf.constant(timestamps)).numpy()
    np.testing.assert_allclose(out, _hstu_numpy(layer, x, mask, timestamps), rtol=1e-4, atol=1e-5)
    without_time = layer(tf.constant(x), tf.constant(mask)).numpy()
    assert not np.allclose(without_time, out, atol=1e-4)  # the time bias takes part
    shifted = timestamps.copy()
    shifted[:, :3] -= 10_000_000  # older first events: other gaps, other buckets
    assert not np.allclose(layer(tf.constant(x), tf.constant(mask), timestamps=tf.constant(shifted)).numpy(), out)


def test_hstu_is_causal_and_ignores_padding():
    layer, (x, mask, timestamps) = _hstu(), _inputs()
    out = layer(tf.constant(x), tf.constant(mask), timestamps=tf.constant(timestamps)).numpy()
    changed = x.copy()
    changed[:, 3] += 1.0
    out_changed = layer(tf.constant(changed), tf.constant(mask), timestamps=tf.constant(timestamps)).numpy()
    np.testing.assert_allclose(out_changed[:, :3], out[:, :3], atol=1e-5)  # no position sees a later one
    assert not np.allclose(out_changed[0, 3:], out[0, 3:], atol=1e-4)
    # The short history alone, without padding, gives the same outputs (SiLU / n, n fixed at max_length).
    alone = layer(tf.constant(x[1:, :4]), tf.constant(mask[1:, :4]), timestamps=tf.constant(timestamps[1:, :4]))
    np.testing.assert_allclose(alone.numpy()[0], out[1, :4], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[1, 4:], 0.0)


def test_hstu_gate_closed_passes_the_input_through():
    layer, (x, mask, timestamps) = _hstu(blocks=1), _inputs()
    layer(tf.constant(x), tf.constant(mask))  # Keras creates the blocks' weights on the first call
    kernel, bias = layer.uvqk[0].weights
    width = layer.heads * layer.head_dim
    kernel.assign(tf.concat([tf.zeros([8, width]), kernel[:, width:]], axis=1))
    bias.assign(tf.concat([tf.fill([width], -50.0), bias[width:]], axis=0))  # U = SiLU(-50) ~ 0
    out = layer(tf.constant(x), tf.constant(mask), timestamps=tf.constant(timestamps)).numpy()
    projection_bias = layer.projections[0].bias.numpy()
    np.testing.assert_allclose(out, (x + projection_bias) * mask[..., None], atol=1e-4)


def test_causal_mean_pool_by_hand():
    x = np.arange(12, dtype=np.float32).reshape(1, 4, 3)
    mask = np.array([[True, True, True, False]])
    out = CausalMeanPool()(tf.constant(x), tf.constant(mask)).numpy()
    expected = np.stack([x[0, :1].mean(0), x[0, :2].mean(0), x[0, :3].mean(0), np.zeros(3)])
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)


@pytest.mark.parametrize("encoder", ["attention", "hstu"])
def test_one_pass_gives_every_position_the_query_of_its_own_prefix(encoder):
    if encoder == "attention":
        layer = CausalSelfAttention(8, heads=2, blocks=2, dropout=0.0, positions="from_start")
    else:
        layer = _hstu(8)
    model = NextItemModel(items=20, dim=8, encoder=layer, dropout=0.0)
    sequence = np.array([[3, 7, 1, 9, 12, 4]], np.int32)
    times = np.array([[10, 20, 400, 5_000, 5_001, 90_000]], np.int64)
    whole = model(tf.constant(sequence), tf.constant(times)).numpy()[0]
    for position in range(sequence.shape[1]):
        prefix = model(tf.constant(sequence[:, : position + 1]), tf.constant(times[:, : position + 1])).numpy()[0]
        np.testing.assert_allclose(whole[position], prefix[-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(whole, axis=-1), 1.0, rtol=1e-5)
    if encoder == "attention":  # counted back from the latest item, a position would know what follows it
        recency = CausalSelfAttention(8, heads=2, blocks=2, dropout=0.0)
        recency(tf.constant(whole[None]), tf.ones([1, 6], tf.bool))
        recency.set_weights(layer.get_weights())
        model.encoder = recency
        assert not np.allclose(
            model(tf.constant(sequence)).numpy()[0, 2], model(tf.constant(sequence[:, :3])).numpy()[0, -1]
        )


def test_next_item_logits_by_hand():
    rng = np.random.default_rng(4)
    items = rng.normal(size=(6, 3)).astype(np.float32)
    queries = rng.normal(size=(1, 2, 3)).astype(np.float32)
    targets = np.array([[2, 5]], np.int32)
    sequence_negatives = np.array([[5, 1]], np.int32)  # 5 is position 1's own target: masked there
    shared = np.array([2, 3], np.int32)  # 2 is position 0's target: masked there
    log_q = np.log(np.array([1.0, 0.5, 0.25, 0.125, 2.0, 4.0], np.float32))  # per code
    temperature = 0.5
    logits = next_item_logits(
        tf.constant(queries),
        tf.constant(targets),
        tf.constant(items),
        tf.constant(sequence_negatives),
        tf.constant(shared),
        temperature,
        tf.constant(log_q),
    ).numpy()
    for position, masked in ((0, 3), (1, 1)):
        columns = [targets[0, position], 5, 1, 2, 3]
        expected = np.array([queries[0, position] @ items[c] / temperature - log_q[c] for c in columns])
        kept = [c for c in range(5) if c != masked]
        np.testing.assert_allclose(logits[0, position, kept], expected[kept], rtol=1e-5)
        assert logits[0, position, masked] < -1e8
    uncorrected = next_item_logits(
        tf.constant(queries), tf.constant(targets), tf.constant(items), None, tf.constant(shared), temperature
    ).numpy()
    np.testing.assert_allclose(
        uncorrected[0, 1], [queries[0, 1] @ items[c] / temperature for c in (5, 2, 3)], rtol=1e-5
    )


def test_trainer_scores_every_valid_position_once():
    model = NextItemModel(items=10, dim=4, encoder=CausalMeanPool(), dropout=0.0)
    trainer = NextItemTrainer.for_model(model, np.ones(11), uniform_negatives=5, in_batch_negatives=3)
    sequences = tf.constant([[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]], tf.int32)
    logits, labels = trainer.logits_and_labels((sequences, tf.zeros_like(sequences, tf.int64)), training=False)
    assert logits.shape == (4 + 1, 1 + 5 + 3)  # positions with a next item; target, 5 uniform, 3 in-batch
    np.testing.assert_array_equal(labels.numpy()[:, 0], 1.0)


@pytest.mark.parametrize("encoder", ["attention", "hstu"])
def test_next_item_training_learns_an_order_mean_pooling_cannot(encoder):
    """Each user walks a cycle of 12 items, one step forward at a time: the next item follows
    from the latest item alone, which an order-blind mean of the history cannot tell."""
    tf.random.set_seed(0)
    rng = np.random.default_rng(0)
    starts = rng.integers(0, 12, size=256)
    sequences = np.array([(start + np.arange(10)) % 12 + 1 for start in starts], np.int32)
    times = np.tile(np.arange(10, dtype=np.int64) * 60, (256, 1))
    if encoder == "attention":
        layer = CausalSelfAttention(10, heads=1, blocks=1, dropout=0.0, positions="from_start")
    else:
        layer = _hstu(10, 1, 1, dim=16)

    def next_item_accuracy(model):
        queries = model(tf.constant(sequences[:, :-1]), tf.constant(times[:, :-1]))[:, -1]
        predicted = np.argmax((queries @ tf.transpose(model.item_vectors())).numpy(), axis=1) + 1
        return float((predicted == sequences[:, -1]).mean())

    accuracy = {}
    for name, encoder_layer in (("sequence", layer), ("mean", CausalMeanPool())):
        model = NextItemModel(items=12, dim=16, encoder=encoder_layer, dropout=0.0)
        trainer = NextItemTrainer.for_model(
            model, np.ones(13), uniform_negatives=8, temperature=0.1, learning_rate=1e-2
        )
        for _ in range(60):
            trainer.step((tf.constant(sequences), tf.constant(times)))
        accuracy[name] = next_item_accuracy(model)
    assert accuracy["sequence"] > 0.9 and accuracy["mean"] < 0.5, accuracy

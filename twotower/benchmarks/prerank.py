"""``make benchmark-prerank``: IntTower's Table 2 (MovieLens-1M column) as a click-through task.

The protocol is the official code's (github.com/archersama/IntTower, train_movielens_*.py):
ratings of 3 dropped, > 3 is a click, < 3 is not; rows sorted by time, then a random 80/20
train/test split (sklearn's ``train_test_split``: a seeded permutation, the first 20% test);
the last 20% of the training rows validate (Keras' ``validation_split``), and training stops
when the validation AUC has not improved for ``patience`` epochs, keeping the best epoch.
User features user_id, gender, age, occupation; item features movie id and genres (mean-pooled);
embeddings of 32 with L2 1e-5; towers (300, 300, 128) with batch norm and dropout 0.3; Adam
1e-3, batch 2048, BCE summed over the batch (as the official code sums it, so the L2 and the
auxiliary losses, also sums over rows, weigh what they weigh there). Test AUC and LogLoss.

Two setups. ``no_mean_rating``: the features above. ``train_mean_rating``: plus each user's and
each item's mean rating as a dense feature (as the official code, the mean of the 0/1 label),
computed on the training rows that are fitted (not validation, not test) and looked up for every
split; ids unseen there get the global training mean. ``split_mean_rating``: the official code's
own features, for comparison only: the means are computed inside each part of its split, the
training part (fitted and validation rows) for itself and the test rows for themselves, so every
test row's feature is built from the test labels; that setup measures what the leak is worth.

Rows: ``lr``; ``two_tower`` (dot product of the towers' outputs, sigmoid); ``dat`` (each id's
augmented vector in its tower's input, taught the other tower's output on clicks; the mimic loss
of ``models/dat.py``, no category alignment); ``inttower`` (Light-SE, FE-Block, CIR:
``models/inttower.py``); ``dcn_v2`` (merlin-models' DCN-v2 CrossBlock, then the same MLP:
a ranking model, which sees user and item features together from the first layer).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import merlin.models.tf as mm
import numpy as np
import pandas as pd
import tensorflow as tf
from scipy.stats import rankdata

from twotower.benchmarks.harness import Column, output_folder, text_table, write_report
from twotower.config import ModelConfig, PrerankConfig, RecipeConfig
from twotower.models.dat import AugmentedVector, mimic_distances
from twotower.models.gating import LightSE
from twotower.models.inttower import FEBlock, check_inttower, contrastive_interaction_loss, fe_score, head_sources
from twotower.stages.data import load_dataset
from twotower.stages.train import set_seeds, shuffled_batches
from twotower.store.artifacts import RecipeData, Split

SETUPS = ("no_mean_rating", "train_mean_rating", "split_mean_rating")
MODELS = ("lr", "two_tower", "dat", "inttower", "dcn_v2")
# IntTower's Table 2, MovieLens-1M: (AUC, LogLoss); the paper's DCN is the row dcn_v2 stands against
PAPER = {
    "lr": (0.8501, 0.4845),
    "two_tower": (0.8697, 0.4559),
    "dat": (0.8712, 0.4556),
    "cold": (0.8836, 0.3297),
    "dcn_v2": (0.8964, 0.3151),
    "inttower": (0.8974, 0.3128),
}
USER_FIELDS = ("user_id", "gender", "age", "occupation")
ITEM_FIELDS = ("item_id", "genres")
MEAN_RATING = {"user": "user_mean_rating", "item": "item_mean_rating"}
LABEL = "label"
SPLIT_NAMES = ("train", "valid", "test")


# --------------------------------------------------------------------------- data
def click_rows(interactions: pd.DataFrame) -> pd.DataFrame:
    """Ratings other than 3, labelled 1 above 3 and 0 below."""
    rows = interactions[interactions["rating"] != 3]
    return rows.assign(**{LABEL: (rows["rating"] > 3).astype(np.float32)}).reset_index(drop=True)


def prerank_split(rows: pd.DataFrame, test_fraction: float, validation_fraction: float, seed: int) -> Split:
    """Sorted by time, then sklearn's shuffled split: test = the first ceil(test_fraction * n)
    rows of a seeded permutation, training = the rest in permutation order, whose last
    ``validation_fraction`` validates (Keras: the first int(n * (1 - fraction)) rows train)."""
    ordered = rows.sort_values("timestamp", kind="stable").reset_index(drop=True)
    permutation = np.random.RandomState(seed).permutation(len(ordered))
    n_test = math.ceil(test_fraction * len(ordered))
    training = ordered.iloc[permutation[n_test:]].reset_index(drop=True)
    split_at = int(len(training) * (1 - validation_fraction))
    return Split(
        train=training.iloc[:split_at].reset_index(drop=True),
        valid=training.iloc[split_at:].reset_index(drop=True),
        test=ordered.iloc[permutation[:n_test]].reset_index(drop=True),
    )


def mean_rating_features(fitted: pd.DataFrame, rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """Each row's user and item mean label over ``fitted`` only; ids absent there get its global mean."""
    overall = fitted[LABEL].mean()
    features = {}
    for side, column in (("user", "user_id"), ("item", "item_id")):
        means = fitted.groupby(column)[LABEL].mean()
        features[MEAN_RATING[side]] = rows[column].map(means).fillna(overall).to_numpy(np.float32)[:, None]
    return features


@dataclass
class Encoding:
    """Codes for the categorical fields, from the full user and item tables (no labels involved)."""

    users: pd.DataFrame  # indexed by user_id: one code column per user field
    item_codes: pd.Series  # item_id -> code
    genres: np.ndarray  # [items, longest list] genre codes + 1, 0 pads; row = item code
    cardinalities: dict[str, int]

    @classmethod
    def of(cls, data: RecipeData) -> Encoding:
        users = pd.DataFrame(
            {field: pd.factorize(data.users[field], sort=True)[0] for field in USER_FIELDS}, index=data.users["user_id"]
        )
        item_codes = pd.Series(np.arange(len(data.items)), index=data.items["item_id"])
        vocabulary = {
            genre: code for code, genre in enumerate(sorted({g for gs in data.items["genres"] for g in gs}), start=1)
        }
        lists = [[vocabulary[g] for g in gs] for gs in data.items["genres"]]
        genres = np.zeros((len(lists), max(1, max(map(len, lists)))), dtype=np.int64)
        for row, codes in enumerate(lists):
            genres[row, : len(codes)] = codes
        cardinalities = {
            **{field: int(users[field].max()) + 1 for field in USER_FIELDS},
            "item_id": len(item_codes),
            "genres": len(vocabulary) + 1,
        }
        return cls(users, item_codes, genres, cardinalities)

    def features(self, rows: pd.DataFrame) -> dict[str, np.ndarray]:
        users = self.users.loc[rows["user_id"].to_numpy()]
        items = self.item_codes.loc[rows["item_id"].to_numpy()].to_numpy()
        return {
            **{field: users[field].to_numpy(np.int64) for field in USER_FIELDS},
            "item_id": items,
            "genres": self.genres[items],
        }


@dataclass
class Prepared:
    """One setup's feature arrays per split, and the dense features each tower takes."""

    splits: dict[str, tuple[dict[str, np.ndarray], np.ndarray]]  # split -> (features, labels)
    dense: dict[str, tuple[str, ...]]  # side -> dense feature names
    cardinalities: dict[str, int]


def mean_rating_sources(split: Split, setup: str) -> dict[str, pd.DataFrame]:
    """Per part of ``split``, the rows whose labels its mean-rating features come from (none: no such features)."""
    if setup == "no_mean_rating":
        return {}
    if setup == "train_mean_rating":
        return {name: split.train for name in SPLIT_NAMES}
    # split_mean_rating, the official code's: its training part (fitted and validation rows) and its test rows
    # each for themselves
    training = pd.concat([split.train, split.valid])
    return {"train": training, "valid": training, "test": split.test}


def prepare(split: Split, encoding: Encoding, setup: str) -> Prepared:
    sources = mean_rating_sources(split, setup)
    splits = {}
    for name in SPLIT_NAMES:
        rows = getattr(split, name)
        features = encoding.features(rows)
        if sources:
            features.update(mean_rating_features(sources[name], rows))
        splits[name] = (features, rows[LABEL].to_numpy(np.float32))
    dense = {side: (MEAN_RATING[side],) if sources else () for side in MEAN_RATING}
    return Prepared(splits, dense, encoding.cardinalities)


# ------------------------------------------------------------------------- models
class FieldEmbeddings(tf.keras.layers.Layer):
    """One table per field, L2-regularised; a list field ([batch, length], 0 pads) mean-pooled."""

    def __init__(self, cardinalities: dict[str, int], dim: int, l2: float, init_std: float, **kwargs):
        super().__init__(**kwargs)
        self.tables = {
            name: tf.keras.layers.Embedding(
                rows,
                dim,
                embeddings_initializer=_normal(init_std),
                embeddings_regularizer=tf.keras.regularizers.l2(l2),
                name=f"{name}_table",
            )
            for name, rows in cardinalities.items()
        }

    def call(self, features: dict[str, tf.Tensor], fields: tuple[str, ...]) -> tf.Tensor:
        """[batch, fields, dim]."""
        embedded = []
        for name in fields:
            codes = features[name]
            vectors = self.tables[name](codes)
            if codes.shape.rank == 2:
                mask = tf.cast(codes > 0, vectors.dtype)[..., None]
                vectors = tf.reduce_sum(vectors * mask, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)
            embedded.append(vectors)
        return tf.stack(embedded, axis=1)


def _flat(fields: tf.Tensor, features: dict, dense: tuple[str, ...]) -> tf.Tensor:
    flat = tf.reshape(fields, [-1, fields.shape[1] * fields.shape[2]])
    return tf.concat([flat, *(features[name] for name in dense)], axis=-1)


def _normal(std: float) -> tf.keras.initializers.Initializer:
    return tf.keras.initializers.RandomNormal(stddev=std)


def _mlp_layers(settings: PrerankConfig) -> list[mm.Block]:
    """One merlin-models MLPBlock per layer (ReLU, batch norm, dropout), so each output is reachable.

    Batch norm as PyTorch's defaults, which the official code runs: Keras' momentum of 0.99 leaves the
    moving statistics far behind the fast-growing activations of a near-zero start, and inference
    (validation, test) then normalises with stale ones."""
    return [
        mm.MLPBlock(
            [units],
            kernel_initializer=_normal(settings.init_std),
            normalization=tf.keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5),
            dropout=settings.dropout,
        )
        for units in settings.tower_layers
    ]


class ClickModel(tf.keras.Model):
    """A model of the benchmark: ``call`` gives click logits [batch, 1]. While training, the
    batch's labels come in ``features["label"]`` for the losses that need them."""

    def __init__(self, prepared: Prepared, settings: PrerankConfig, dim: int | None = None):
        super().__init__()
        self.dense = prepared.dense
        self.embeddings = FieldEmbeddings(
            prepared.cardinalities, dim or settings.embedding_dim, settings.embedding_l2, settings.init_std
        )
        self.bias = tf.Variable(0.0, name="bias")

    def logits(self, features: dict, training: bool) -> tf.Tensor:
        raise NotImplementedError

    def call(self, features, training=False):
        return (self.logits(features, training) + self.bias)[:, None]


class LogisticRegression(ClickModel):
    """A weight per field value (embeddings of size 1), a weight per dense feature."""

    def __init__(self, prepared: Prepared, settings: PrerankConfig):
        super().__init__(prepared, settings, dim=1)
        self.dense_weights = tf.keras.layers.Dense(1, use_bias=False)

    def logits(self, features, training):
        score = tf.reduce_sum(self.embeddings(features, USER_FIELDS + ITEM_FIELDS), axis=[1, 2])
        dense = [features[name] for side in ("user", "item") for name in self.dense[side]]
        return score + (self.dense_weights(tf.concat(dense, axis=-1))[:, 0] if dense else 0.0)


class Tower(tf.keras.layers.Layer):
    """Field embeddings, optionally Light-SE gated and with an id's augmented vector, then the
    MLP; ``call`` returns the MLP's input and every layer's output."""

    def __init__(
        self,
        settings: PrerankConfig,
        dense: tuple[str, ...],
        gate: bool = False,
        augment: AugmentedVector | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.dense, self.augment = dense, augment
        self.gate = LightSE() if gate else None
        self.mlp = _mlp_layers(settings)

    def call(self, fields: tf.Tensor, features: dict, training=False) -> tuple[tf.Tensor, list[tf.Tensor]]:
        hidden = _flat(self.gate(fields) if self.gate is not None else fields, features, self.dense)
        if self.augment is not None:
            hidden = self.augment(hidden, features)
        tower_input, outputs = hidden, []
        for layer in self.mlp:
            hidden = layer(hidden, training=training)
            outputs.append(hidden)
        return tower_input, outputs


class TwoTowerClick(ClickModel):
    """``two_tower``: <user tower, item tower>; ``dat``: plus augmented vectors and the mimic
    loss on clicks; ``inttower``: Light-SE in both towers, the FE score instead of the dot
    product, and CIR."""

    def __init__(self, prepared: Prepared, settings: PrerankConfig, kind: str, model: ModelConfig):
        super().__init__(prepared, settings)
        self.kind, self.model_config, self.settings = kind, model, settings
        augments = [None, None]
        if kind == "dat":
            augments = [
                AugmentedVector(column, prepared.cardinalities[column], settings.tower_layers[-1])
                for column in ("user_id", "item_id")
            ]
        gate = kind == "inttower"
        self.user_tower = Tower(settings, prepared.dense["user"], gate, augments[0])
        self.item_tower = Tower(settings, prepared.dense["item"], gate, augments[1])
        if kind == "inttower":
            check_inttower(settings.inttower, len(settings.tower_layers), "benchmark.prerank.inttower")
            fe = settings.inttower
            self.fe = FEBlock(len(fe.fe_layers), fe.user_heads, fe.item_heads, fe.head_size)

    def logits(self, features, training):
        user_input, user = self.user_tower(self.embeddings(features, USER_FIELDS), features, training=training)
        _, item = self.item_tower(self.embeddings(features, ITEM_FIELDS), features, training=training)
        labels = features.get(LABEL) if training else None
        if self.kind == "inttower":
            fe = self.settings.inttower
            user_heads, item_heads = self.fe.heads(
                head_sources(user_input, user, fe.fe_layers, fe.user_heads_from), item[-1]
            )
            if labels is not None and fe.cir_weight:
                self.add_loss(
                    fe.cir_weight
                    * tf.reduce_sum(
                        contrastive_interaction_loss(user_heads[-1], item_heads, labels, fe.cir_temperature)
                    )
                )
            score = fe_score(user_heads, item_heads)
            return score / (len(user_heads) * fe.user_heads) if self.settings.inttower_logit == "mean" else score
        if self.kind == "dat" and labels is not None:
            dat, clicks = self.model_config.dat, tf.reshape(labels, [-1])
            a_u = self.user_tower.augment.lookup(features["user_id"])
            a_v = self.item_tower.augment.lookup(features["item_id"])
            self.add_loss(
                tf.reduce_sum(
                    clicks
                    * (
                        dat.user_mimic_weight * mimic_distances(a_u, item[-1])
                        + dat.item_mimic_weight * mimic_distances(a_v, user[-1])
                    )
                )
            )
        return tf.reduce_sum(user[-1] * item[-1], axis=-1)


class DeepCrossNetwork(ClickModel):
    """``dcn_v2``: every field together, merlin-models' CrossBlock (DCN-v2), the MLP, a logit."""

    def __init__(self, prepared: Prepared, settings: PrerankConfig):
        super().__init__(prepared, settings)
        self.cross = mm.CrossBlock(settings.cross_depth)
        self.mlp = _mlp_layers(settings)
        self.out = tf.keras.layers.Dense(1, use_bias=False)

    def logits(self, features, training):
        hidden = self.cross(
            _flat(
                self.embeddings(features, USER_FIELDS + ITEM_FIELDS), features, self.dense["user"] + self.dense["item"]
            )
        )
        for layer in self.mlp:
            hidden = layer(hidden, training=training)
        return self.out(hidden)[:, 0]


def build(name: str, prepared: Prepared, settings: PrerankConfig, model: ModelConfig) -> ClickModel:
    if name == "lr":
        return LogisticRegression(prepared, settings)
    if name == "dcn_v2":
        return DeepCrossNetwork(prepared, settings)
    return TwoTowerClick(prepared, settings, name, model)


# ----------------------------------------------------------------------- training
def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    ranks = rankdata(scores)
    positives = labels > 0.5
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    p = np.clip(probabilities, 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def probabilities(model: ClickModel, features: dict[str, np.ndarray]) -> np.ndarray:
    batches = tf.data.Dataset.from_tensor_slices(features).batch(8192)
    return tf.sigmoid(model.predict(batches, verbose=0)[:, 0]).numpy().astype(np.float64)


class BestValidationAUC(tf.keras.callbacks.Callback):
    """Validation AUC after each epoch; stops after ``patience`` epochs without a better one
    and puts the best epoch's weights back at the end."""

    def __init__(self, validation: tuple[dict, np.ndarray], patience: int, label: str, epochs: int):
        super().__init__()
        self.validation, self.patience, self.label, self.epochs = validation, patience, label, epochs
        self.history: list[dict] = []
        self.best, self.best_epoch, self.best_weights = -1.0, 0, None

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        value = auc(self.validation[1], probabilities(self.model, self.validation[0]))
        seconds = time.perf_counter() - self.started
        self.history.append({"epoch": epoch + 1, "loss": float(logs["loss"]), "val_auc": value, "seconds": seconds})
        if value > self.best:
            self.best, self.best_epoch, self.best_weights = value, epoch + 1, self.model.get_weights()
        print(
            f"[prerank] {self.label} epoch {epoch + 1}/{self.epochs}: "
            f"loss {logs['loss']:.1f} val AUC {value:.4f} ({seconds:.0f} s)",
            flush=True,
        )
        if epoch + 1 - self.best_epoch >= self.patience:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)


def train_and_test(
    name: str, prepared: Prepared, settings: PrerankConfig, model_config: ModelConfig, seed: int, label: str
) -> dict:
    started = time.perf_counter()
    set_seeds(seed)
    model = build(name, prepared, settings, model_config)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(settings.learning_rate),
        loss=tf.keras.losses.BinaryCrossentropy(from_logits=True, reduction=tf.keras.losses.Reduction.SUM),
    )
    features, labels = prepared.splits["train"]
    tensors = {**{key: tf.constant(value) for key, value in features.items()}, LABEL: tf.constant(labels[:, None])}
    batches = shuffled_batches(tensors, settings.batch_size, seed).map(lambda batch: (batch, batch[LABEL]))
    stopper = BestValidationAUC(prepared.splits["valid"], settings.patience, label, settings.epochs)
    model.fit(batches, epochs=settings.epochs, callbacks=[stopper], verbose=0)
    test_features, test_labels = prepared.splits["test"]
    predicted = probabilities(model, test_features)
    return {
        "auc": auc(test_labels, predicted),
        "logloss": log_loss(test_labels, predicted),
        "val_auc": stopper.best,
        "best_epoch": stopper.best_epoch,
        "epochs_run": len(stopper.history),
        "params": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
        "seconds": time.perf_counter() - started,
        "history": stopper.history,
    }


# ------------------------------------------------------------------------- report
def _chosen(names: list[str], known: tuple[str, ...], key: str) -> list[str]:
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"benchmark.prerank.{key}: unknown {unknown}; known: {', '.join(known)}")
    return names or list(known)


def table(rows: dict[str, dict[str, dict]]) -> str:
    """The paper's rows beside ours, per setup: AUC, LogLoss and the AUC's gap to the paper."""
    setups = list(rows)
    columns = [Column("model", 11), Column("paper AUC", 10), Column("LogLoss", 9)]
    for setup in setups:
        columns += [Column(f"{setup} AUC", 24), Column("LogLoss", 9), Column("vs paper", 9, "+.4f")]
    lines = []
    for name in dict.fromkeys([*PAPER, *(m for setup in setups for m in rows[setup])]):
        paper = PAPER.get(name, (None, None))
        line = [name, *paper]
        for setup in setups:
            row = rows[setup].get(name) or {}
            auc = row.get("auc")
            gap = auc - paper[0] if auc is not None and paper[0] is not None else None
            line += [auc, row.get("logloss"), gap]
        lines.append(line)
    return text_table(columns, lines)


def run_prerank_benchmark(config: RecipeConfig) -> Path:
    settings = config.benchmark.prerank
    started = time.perf_counter()
    models, setups = _chosen(settings.models, MODELS, "models"), _chosen(settings.setups, SETUPS, "setups")
    out_dir = output_folder(config, "prerank")
    data = load_dataset(config.data, config.seed)
    interactions = data.interactions
    if 0 < settings.sample_rows < len(interactions):
        interactions = interactions.sample(settings.sample_rows, random_state=config.seed)
    split = prerank_split(click_rows(interactions), settings.test_fraction, settings.validation_fraction, config.seed)
    encoding = Encoding.of(data)
    print(
        f"[prerank] {config.data.dataset}: {len(split.train):,} train, {len(split.valid):,} validation, "
        f"{len(split.test):,} test rows; "
        f"{split.test[LABEL].mean():.3f} of test rows are clicks",
        flush=True,
    )
    rows: dict[str, dict[str, dict]] = {}
    for setup in setups:
        prepared = prepare(split, encoding, setup)
        rows[setup] = {}
        for name in models:
            print(f"\n[prerank] {setup}: {name}", flush=True)
            rows[setup][name] = train_and_test(name, prepared, settings, config.model, config.seed, f"{setup}/{name}")
            print(
                f"[prerank] {setup}/{name}: test AUC {rows[setup][name]['auc']:.4f} "
                f"LogLoss {rows[setup][name]['logloss']:.4f}",
                flush=True,
            )
    report = {
        "date": date.today().isoformat(),
        "dataset": config.data.dataset,
        "protocol": "ratings of 3 dropped, >3 click; sorted by time, seeded random 80/20 split; "
        "last 20% of training rows validate; "
        "early stopping on validation AUC; mean ratings (train_mean_rating) from the fitted training rows only",
        "rows": rows,
        "paper": {name: {"auc": values[0], "logloss": values[1]} for name, values in PAPER.items()},
        "data": {
            "train": len(split.train),
            "valid": len(split.valid),
            "test": len(split.test),
            "test_click_rate": float(split.test[LABEL].mean()),
        },
        "settings": dataclasses.asdict(settings),
        "seed": config.seed,
        "total_seconds": time.perf_counter() - started,
    }
    json_path = write_report(report, out_dir / "prerank.json")
    print("\n" + table(rows))
    print(f"total {report['total_seconds'] / 60:.1f} min")
    print(json_path)
    return json_path

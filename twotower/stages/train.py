"""Stage 3: train the configured model of the family (``twotower.models``) and save its towers.

The model comes from the registry (``model.name``); whatever it is, training fits it on
the encoded training positives, early stopping watches full-catalogue recall on the
validation split, and the test split is scored over the whole catalogue with earlier
positives excluded. Only the model interface (``query_vectors``, ``item_vectors``, tower
save, ``score``) is used here.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import merlin.io
import merlin.models.tf as mm
import numpy as np
import pandas as pd
import tensorflow as tf
from merlin.schema import Schema, Tags

from twotower.config import RecipeConfig, config_to_dict
from twotower.models import SEQUENCE_MODELS, builder
from twotower.models.base import HISTORY, RetrievalModel, TrainingStats
from twotower.models.losses import feature_tensors
from twotower.models.sequence import SequenceRetrievalModel
from twotower.stages.baselines import evaluate_popularity
from twotower.stages.evaluate import EvalSet, build_eval_set, evaluate_scores
from twotower.stages.workflow import Catalogue, category_table, encoded_catalogue, encoded_users, load_saved_workflows
from twotower.store.artifacts import Split, known_before_test, load_recipe_data, load_split, save_item_vectors
from twotower.store.atomic import atomic_dir, atomic_file
from twotower.store.manifest import STAGES, fingerprints, record_stage

NEXT_ITEMS = "__next_items"  # whole-sequence batches: each history position's next item


def set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    tf.random.set_seed(seed)


def item_frequencies(schema: Schema, vocabulary: pd.DataFrame, train_item_ids: pd.Series) -> np.ndarray:
    """Training counts per encoded item id (index = code), floored at 1 for reserved codes."""
    item_id = schema.select_by_tag(Tags.ITEM_ID).first
    counts = np.ones(item_id.int_domain.max + 1, dtype=np.float32)
    train_counts = train_item_ids.value_counts()
    counts[vocabulary.index.to_numpy()] = train_counts.reindex(vocabulary[item_id.name]).fillna(1).to_numpy()
    return counts


@dataclass
class TrainingInputs:
    """What training and evaluation read, all encoded by the saved workflows."""

    split: Split
    consumed: dict[str, str]  # fingerprints of the artifacts these were read from (run manifest)
    train_dataset: merlin.io.Dataset  # encoded training positives, with their Merlin schema
    catalogue: Catalogue
    valid_users: pd.DataFrame  # encoded, history from training positives
    test_users: pd.DataFrame  # encoded, history from everything before the test period
    item_vocabulary: pd.DataFrame  # Categorify's item ids: row index is the code
    item_counts: np.ndarray  # training positives per encoded item id (for the logQ correction)
    # whole-sequence training only: encoded users, history = all their training positives
    sequence_users: pd.DataFrame | None = None
    # which of those positions are trained on as a next item, per user (as sequence_users' index);
    # None: all of them. A warm start trains on the new positives (and replayed ones) only.
    sequence_targets: pd.Series | None = None

    @property
    def schema(self) -> Schema:
        return self.train_dataset.schema

    @property
    def stats(self) -> TrainingStats:
        return TrainingStats(self.item_counts, self.catalogue.features)


def load_training_inputs(config: RecipeConfig) -> TrainingInputs:
    consumed = fingerprints(config, STAGES["train"].consumes)
    data, split = load_recipe_data(config.data_dir), load_split(config.splits_dir)
    workflows = load_saved_workflows(config.workflow_dir)
    train_dataset = merlin.io.Dataset(str(config.train_encoded_dir), engine="parquet")
    history_length = config.train.history_length
    item_vocabulary = category_table(workflows.item, "item_id")
    return TrainingInputs(
        split=split,
        consumed=consumed,
        train_dataset=train_dataset,
        catalogue=encoded_catalogue(workflows, data.items),
        valid_users=encoded_users(workflows, data.users, split.train, history_length),
        test_users=encoded_users(workflows, data.users, known_before_test(split), history_length),
        item_vocabulary=item_vocabulary,
        item_counts=item_frequencies(train_dataset.schema, item_vocabulary, split.train["item_id"]),
        sequence_users=(
            encoded_users(workflows, data.users, split.train, len(split.train))  # every positive: at most all rows
            if trains_whole_sequences(config)
            else None
        ),
    )


def trains_whole_sequences(config: RecipeConfig) -> bool:
    return config.model.name in SEQUENCE_MODELS and config.model.sequence.training == "whole_sequence"


def evaluate_model(
    model: RetrievalModel, eval_set: EvalSet, user_features: pd.DataFrame, catalogue: Catalogue
) -> dict[str, float]:
    """Ranking metrics of ``model`` over the whole catalogue, by its own ``score``; ``user_features``
    is indexed by user id."""
    users = model.query_vectors(user_features.loc[eval_set.user_ids])
    items = model.item_vectors(catalogue.features)
    return evaluate_scores(lambda rows: model.score(users[rows], items), eval_set)


class FullCatalogueEarlyStopping(tf.keras.callbacks.Callback):
    """Validation metrics over the whole catalogue after each epoch; keeps the best weights."""

    def __init__(
        self,
        model: RetrievalModel,
        eval_set: EvalSet,
        user_features: pd.DataFrame,
        catalogue: Catalogue,
        metric: str,
        patience: int,
    ):
        super().__init__()
        self.retrieval_model = model
        self.eval_set = eval_set
        self.user_features = user_features
        self.catalogue = catalogue
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
        metrics = evaluate_model(self.retrieval_model, self.eval_set, self.user_features, self.catalogue)
        record = {
            "epoch": epoch + 1,
            "loss": float((logs or {}).get("loss", np.nan)),
            "train_seconds": train_seconds,
            **{f"val_{k}": v for k, v in metrics.items()},
        }
        self.history.append(record)
        # One line per epoch: with Keras' own progress bar off (verbose=0), this is the progress.
        print(
            f"[train] epoch {epoch + 1}/{self.params['epochs']}: loss {record['loss']:.4f}, validation "
            f"{self.metric} {metrics[self.metric]:.4f}, recall@10 {metrics['recall@10']:.4f} ({train_seconds:.1f} s)",
            flush=True,
        )
        if metrics[self.metric] > self.best_value:
            self.best_value, self.best_epoch = metrics[self.metric], epoch + 1
            self._best_weights = self.model.get_weights()
        elif epoch + 1 - self.best_epoch >= self.patience:
            self.model.stop_training = True

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._best_weights is not None:
            self.model.set_weights(self._best_weights)


def build_model(config: RecipeConfig, inputs: TrainingInputs) -> RetrievalModel:
    """The configured model of the family, compiled, from the schema and training statistics."""
    return builder(config.model.name)(inputs.schema, inputs.stats, config.train, config.model)


def shuffled_batches(tensors: dict[str, tf.Tensor | tf.RaggedTensor], batch_size: int, seed: int) -> tf.data.Dataset:
    """Rows of resident tensors, ``batch_size`` at a time (the last batch may be smaller), in
    a new order every epoch: each batch is one gather per tensor, no per-row work."""
    rows = int(next(iter(tensors.values())).shape[0])
    order = tf.data.Dataset.range(rows).shuffle(rows, seed=seed, reshuffle_each_iteration=True).batch(batch_size)
    return order.map(
        lambda batch_rows: {name: tf.gather(values, batch_rows) for name, values in tensors.items()}
    ).prefetch(tf.data.AUTOTUNE)


def _loader_layout(batch: dict[str, tf.Tensor | tf.RaggedTensor]) -> dict[str, tf.Tensor]:
    """mm.Loader's batch layout, which the model's input block expects: a list column as
    ``<name>__values`` and ``<name>__offsets``."""
    layout = {}
    for name, values in batch.items():
        if isinstance(values, tf.RaggedTensor):
            layout[f"{name}__values"], layout[f"{name}__offsets"] = values.values, values.row_splits
        else:
            layout[name] = values
    return layout


def cached_batches(dataset: merlin.io.Dataset, batch_size: int, seed: int) -> tf.data.Dataset:
    """The encoded rows of ``dataset`` converted to tensors once and kept in memory, batched as
    mm.Loader batches them and reshuffled every epoch."""
    tensors = feature_tensors(dataset.to_ddf().compute(), dataset.schema)
    return shuffled_batches(tensors, batch_size, seed).map(_loader_layout)


def training_batches(
    config: RecipeConfig, dataset: merlin.io.Dataset, batch_size: int | None = None
) -> mm.Loader | tf.data.Dataset:
    """What fit reads each epoch, from the loader ``train.loader`` names, ``batch_size`` positives
    at a time (default ``train.batch_size``)."""
    batch_size = batch_size or config.train.batch_size
    if config.train.loader == "merlin":
        return mm.Loader(dataset, batch_size=batch_size, shuffle=True)
    return cached_batches(dataset, batch_size, config.seed)


def windows(items: list, length: int) -> list[list]:
    """``items`` cut into windows of ``length`` + 1 that share their boundary item, the latest one full
    (as a served history is the latest ``length``): every item but the first is a target once."""
    ends = range(len(items), 1, -length)
    return [items[max(0, end - length - 1) : end] for end in reversed(ends)]


def whole_sequence_batches(config: RecipeConfig, inputs: TrainingInputs) -> tf.data.Dataset:
    """(query features, next items), ``model.sequence.batch_windows`` windows a step: each window of a
    user's training positives (``windows``) is a row with the user's features, ``history`` all its
    items but the last and the next item of each of them (both ragged)."""
    users = inputs.sequence_users
    length = config.train.history_length
    cut = users[HISTORY].map(lambda items: windows(list(items), length))
    rows = users.loc[users.index.repeat(cut.map(len))].assign(**{HISTORY: [w for ws in cut for w in ws]})
    next_items = rows[HISTORY].map(lambda items: list(items[1:]))
    if inputs.sequence_targets is not None:
        # Positions not trained on predict code 0, the padding code no item has: the trainer skips them.
        trained = inputs.sequence_targets.reindex(users.index).map(lambda flags: windows(list(flags), length))
        flags = pd.Series([w[1:] for ws in trained for w in ws], index=rows.index)
        next_items = pd.Series(
            [
                [item if keep else 0 for item, keep in zip(items, keep_flags)]
                for items, keep_flags in zip(next_items, flags)
            ],
            index=rows.index,
        )
        kept = flags.map(any).to_numpy()
        rows, next_items = rows[kept], next_items[kept]
    query_schema = inputs.schema.select_by_tag(Tags.USER)
    tensors = feature_tensors(rows.assign(**{HISTORY: rows[HISTORY].map(lambda items: items[:-1])}), query_schema)
    next_items = feature_tensors(pd.DataFrame({HISTORY: next_items}), query_schema[[HISTORY]])[HISTORY]
    batches = shuffled_batches({**tensors, NEXT_ITEMS: next_items}, config.model.sequence.batch_windows, config.seed)
    return batches.map(lambda batch: ({k: v for k, v in batch.items() if k != NEXT_ITEMS}, batch[NEXT_ITEMS]))


def fit_whole_sequences(
    model: SequenceRetrievalModel, config: RecipeConfig, inputs: TrainingInputs, epochs: int, stopper
) -> None:
    """Next-item training of a sequence model's towers, ``epochs`` at most, ``stopper`` after each."""
    trainer = model.next_item_trainer(
        inputs.catalogue.features,
        inputs.item_counts,
        config.train,
        config.model.loss,
        config.model.sequence.in_batch_negatives,
    )
    batches = whole_sequence_batches(config, inputs)
    stopper.set_model(model.keras)
    stopper.set_params({"epochs": epochs})
    model.keras.stop_training = False
    for epoch in range(epochs):
        stopper.on_epoch_begin(epoch)
        losses = [float(trainer.step(batch)) for batch in batches]
        stopper.on_epoch_end(epoch, {"loss": float(np.mean(losses))})
        if model.keras.stop_training:
            break
    stopper.on_train_end()


def fit_model(
    config: RecipeConfig,
    inputs: TrainingInputs,
    verbose: int = 0,
    epochs: int | None = None,
    warm_start: Path | None = None,
) -> tuple[RetrievalModel, FullCatalogueEarlyStopping]:
    """Build and fit the configured model with full-catalogue early stopping on the validation
    split, for ``epochs`` (default ``train.epochs``). ``warm_start``: weights an earlier train stage
    saved (``RetrievalModel.save_weights``) to start from instead of the initialisation. Returns the
    model (best epoch's weights) and the callback, whose ``history`` and ``best_epoch`` describe the run."""
    set_seeds(config.seed)
    model = build_model(config, inputs)
    whole_sequences = trains_whole_sequences(config)
    batches = training_batches(config, inputs.train_dataset, model.batch_size)
    if warm_start is not None or whole_sequences:
        # merlin-models creates a model's variables on its first call: from one training batch
        first = next(iter(batches))
        first = first[0] if isinstance(first, tuple) else first  # mm.Loader gives (features, targets)
        if warm_start is not None:
            model.load_weights(warm_start, first)
        else:
            model.keras(first, training=False)
    split = inputs.split
    stopper = FullCatalogueEarlyStopping(
        model,
        build_eval_set(split.valid, split.train, inputs.catalogue.item_ids),
        inputs.valid_users,
        inputs.catalogue,
        config.train.early_stopping_metric,
        config.train.early_stopping_patience,
    )
    epochs = config.train.epochs if epochs is None else epochs
    if whole_sequences:
        fit_whole_sequences(model, config, inputs, epochs, stopper)
    else:
        model.keras.fit(batches, epochs=epochs, callbacks=[stopper], verbose=verbose)
    return model, stopper


def held_out_eval_set(inputs: TrainingInputs) -> EvalSet:
    """The test split's users, held-out positives and everything they had before (excluded)."""
    return build_eval_set(inputs.split.test, known_before_test(inputs.split), inputs.catalogue.item_ids)


def evaluate_on_test(
    config: RecipeConfig, inputs: TrainingInputs, model: RetrievalModel
) -> dict[str, dict[str, float]]:
    """Test metrics of the model (under its name) and of popularity, full catalogue, earlier
    positives excluded."""

    test_set = held_out_eval_set(inputs)
    return {
        config.model.name: evaluate_model(model, test_set, inputs.test_users, inputs.catalogue),
        "popularity": evaluate_popularity(inputs.split.train, test_set, inputs.catalogue.item_ids),
    }


def save_training(
    config: RecipeConfig,
    inputs: TrainingInputs,
    model: RetrievalModel,
    stopper: FullCatalogueEarlyStopping,
    results: dict,
    details: dict | None = None,
) -> dict:
    """Both towers and the pair scorer as SavedModels, the whole model's weights, catalogue item vectors, history,
    curves and metrics.json; the model folder is replaced whole, then the run manifest records the
    stage (with ``details``, such as where a warm start started from)."""
    from twotower.views.plots import plot_training

    item_vectors = model.item_vectors(inputs.catalogue.features)
    query_width = model.query_vectors(inputs.valid_users.head(1)).shape[1]
    with atomic_dir(config.model_dir) as model_dir:
        query_dir, candidate_dir, vectors_path, weights_path, scorer_dir = (
            model_dir / path.relative_to(config.model_dir)
            for path in (
                config.query_tower_dir,
                config.candidate_tower_dir,
                config.item_vectors_path,
                config.model_weights_path,
                config.pair_scorer_dir,
            )
        )
        model.save_query_tower(query_dir)
        model.save_item_tower(candidate_dir)
        model.save_pair_scorer(scorer_dir, query_width, item_vectors.shape[1])
        model.save_weights(weights_path)
        save_item_vectors(inputs.catalogue.item_ids, item_vectors, vectors_path)
        save_history(stopper.history, model_dir / "history.json")
    with atomic_file(config.output_dir / "training_curves.png") as staging:
        plot_training(stopper.history, staging)
    metrics = {
        "dataset": config.data.dataset,
        "model": config.model.name,
        "protocol": "full catalogue, earlier positives excluded, per-user temporal holdout",
        "test_users": int(inputs.split.test["user_id"].nunique()),
        "catalogue_items": int(len(inputs.catalogue.item_ids)),
        "trainable_parameters": model.parameter_count(),
        "best_epoch": stopper.best_epoch,
        "test": results,
        "history": stopper.history,
        "config": config_to_dict(config),
    }
    with atomic_file(config.metrics_path) as staging:
        staging.write_text(json.dumps(metrics, indent=2))
    record_stage(config, "train", inputs.consumed, details)
    return metrics


def train_and_save(
    config: RecipeConfig, verbose: int = 0, inputs: TrainingInputs | None = None
) -> tuple[RetrievalModel, dict]:
    """The train stage: fit, evaluate on the test split, save; the model and its metrics.
    ``inputs``: the run's training inputs if the caller already loaded them."""
    inputs = inputs or load_training_inputs(config)
    model, stopper = fit_model(config, inputs, verbose=verbose)
    metrics = save_training(config, inputs, model, stopper, evaluate_on_test(config, inputs, model))
    return model, metrics


def print_metrics(results: dict[str, dict[str, float]]) -> None:
    names = list(next(iter(results.values())))
    print(f"{'model':<14}" + "".join(f"{n:>13}" for n in names))
    for model_name, values in results.items():
        print(f"{model_name:<14}" + "".join(f"{values[n]:>13.4f}" for n in names))


def save_history(history: list[dict[str, float]], path: Path) -> None:
    path.write_text(json.dumps(history, indent=2))

"""The recipe's stages wired together; each reads and writes under the output folder.

Stages: data -> workflow -> train -> index -> features -> export, then serve/query.
Each stage writes its outputs atomically and records what it consumed and produced in
the run manifest; the export refuses parts that come from different runs (manifest.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd

from twotower.config import RecipeConfig, config_to_dict
from twotower.data import (
    RecipeData,
    Split,
    join_features,
    latest_history,
    load_dataset,
    positives,
    split_by_time,
    users_with_history,
)
from twotower.manifest import (
    EXPORT_RECORD,
    STAGES,
    atomic_dir,
    atomic_file,
    check_export,
    fingerprint,
    fingerprints,
    record_stage,
    recorded_stage,
)

if TYPE_CHECKING:  # heavy imports stay lazy: the CLI loads TensorFlow only for stages that need it
    import merlin.io
    from feast import FeatureStore

    from twotower.train import Catalogue

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


# ---------------------------------------------------------------- stage helpers
def _save_frame(frame: pd.DataFrame, path: Path) -> None:
    with atomic_file(path) as staging:
        frame.to_parquet(staging, index=False)


def load_recipe_data(config: RecipeConfig) -> RecipeData:
    try:
        return RecipeData(*(pd.read_parquet(config.data_dir / f"{name}.parquet") for name in ("interactions", "users", "items")))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error.filename} missing: run the 'data' stage first") from error


def load_split(config: RecipeConfig) -> Split:
    return Split(*(pd.read_parquet(config.splits_dir / f"{name}.parquet") for name in SPLITS))


# ----------------------------------------------------------------------- stages
def run_data(config: RecipeConfig) -> Split:
    """Load the data set, keep positives, split by time, write everything as parquet."""
    dc = config.data
    data = load_dataset(dc.dataset, dc.synthetic_users, dc.synthetic_items, dc.synthetic_interactions_per_user, config.seed)
    split = split_by_time(positives(data.interactions, dc.min_rating), dc.test_fraction, dc.validation_fraction)
    with recorded_stage(config, "data"):
        for name, frame in (("interactions", data.interactions), ("users", data.users), ("items", data.items)):
            _save_frame(frame, config.data_dir / f"{name}.parquet")
        with atomic_dir(config.splits_dir) as splits_dir:
            for name in SPLITS:
                getattr(split, name).to_parquet(splits_dir / f"{name}.parquet", index=False)
    print(
        f"[data] {dc.dataset}: {len(data.interactions):,} interactions, {len(data.users):,} users, "
        f"{len(data.items):,} items; positives train/valid/test = "
        f"{len(split.train):,}/{len(split.valid):,}/{len(split.test):,}"
    )
    return split


def run_workflow(config: RecipeConfig) -> None:
    """Fit the NVTabular workflow on the training split; write encoded training parquet."""
    from twotower.workflow import dask_execution, fit_workflow, save_workflows, transform_to_parquet

    with recorded_stage(config, "workflow"):
        data, split = load_recipe_data(config), load_split(config)
        train_rows = join_features(split.train, data, config.train.history_length)
        # Both folders are built aside and swapped in at the end: the fitted vocabularies
        # (fit/) and the encoded rows are only replaced together with the saved workflows.
        with (
            dask_execution(config.workflow) as partitions,
            atomic_dir(config.workflow_dir) as workflow_dir,
            atomic_dir(config.train_encoded_dir) as encoded_dir,
        ):
            workflow = fit_workflow(train_rows, workflow_dir / "fit", partitions)
            save_workflows(workflow, workflow_dir)
            transform_to_parquet(workflow, train_rows, encoded_dir, partitions)
    print(f"[workflow] fitted on {len(train_rows):,} training rows in {partitions} partition(s); saved to {config.workflow_dir}")


def encoded_catalogue(config: RecipeConfig, data: RecipeData) -> Catalogue:
    """The retrievable items (the fitted item vocabulary, sorted by dataset id) with their
    features encoded by the saved item workflow (no refit)."""
    from twotower.train import Catalogue
    from twotower.workflow import category_table, load_workflow, transform_frame

    item_workflow = load_workflow(config.workflow_dir, "item")
    item_ids = np.sort(category_table(item_workflow, "item_id")["item_id"].to_numpy())
    items = data.items[data.items["item_id"].isin(item_ids)].sort_values("item_id")
    return Catalogue(item_ids=item_ids, features=transform_frame(item_workflow, items))


def user_rows(config: RecipeConfig, data: RecipeData, history_rows: pd.DataFrame) -> pd.DataFrame:
    """Every user's raw features with history taken from ``history_rows``."""
    return users_with_history(data.users, history_rows, config.train.history_length)


def encode_users(config: RecipeConfig, users: pd.DataFrame) -> pd.DataFrame:
    """``users`` encoded by the saved user workflow, indexed by dataset user id."""
    from twotower.workflow import load_workflow, transform_frame

    return transform_frame(load_workflow(config.workflow_dir, "user"), users).set_index(users["user_id"].to_numpy())


def encoded_users(config: RecipeConfig, data: RecipeData, history_rows: pd.DataFrame) -> pd.DataFrame:
    """Every user's encoded features, history taken from ``history_rows``."""
    return encode_users(config, user_rows(config, data, history_rows))


def known_before_test(split: Split) -> pd.DataFrame:
    """Positives before the test period: the history the server and the test evaluation see."""
    return pd.concat([split.train, split.valid])


@dataclass
class TrainingInputs:
    """What training and evaluation read, all encoded by the saved workflows."""

    split: Split
    consumed: dict[str, str]  # fingerprints of the artifacts these were read from (run manifest)
    train_dataset: merlin.io.Dataset  # encoded training positives, with their Merlin schema
    catalogue: Catalogue
    valid_users: pd.DataFrame  # encoded, history from training positives
    test_users: pd.DataFrame  # encoded, history from everything before the test period
    item_counts: np.ndarray  # training positives per encoded item id (for the logQ correction)

    @property
    def schema(self):
        return self.train_dataset.schema


def load_training_inputs(config: RecipeConfig) -> TrainingInputs:
    import merlin.io

    from twotower.train import item_frequencies
    from twotower.workflow import category_table, load_workflow

    consumed = fingerprints(config, STAGES["train"].consumes)
    data, split = load_recipe_data(config), load_split(config)
    train_dataset = merlin.io.Dataset(str(config.train_encoded_dir), engine="parquet")
    vocabulary = category_table(load_workflow(config.workflow_dir, "item"), "item_id")
    return TrainingInputs(
        split=split,
        consumed=consumed,
        train_dataset=train_dataset,
        catalogue=encoded_catalogue(config, data),
        valid_users=encoded_users(config, data, split.train),
        test_users=encoded_users(config, data, known_before_test(split)),
        item_counts=item_frequencies(train_dataset.schema, vocabulary, split.train["item_id"]),
    )


def fit_two_tower(config: RecipeConfig, inputs: TrainingInputs, verbose: int = 1):
    """Build and fit the model with full-catalogue early stopping on the validation split.

    Returns the model (with the best epoch's weights) and the early-stopping callback,
    whose ``history`` and ``best_epoch`` describe the run.
    """
    from twotower.evaluate import build_eval_set
    from twotower.train import FullCatalogueEarlyStopping, set_seeds, train_model

    set_seeds(config.seed)
    split = inputs.split
    stopper = FullCatalogueEarlyStopping(
        build_eval_set(split.valid, split.train, inputs.catalogue.item_ids),
        inputs.valid_users,
        inputs.catalogue,
        inputs.schema,
        config.train.early_stopping_metric,
        config.train.early_stopping_patience,
    )
    model, _ = train_model(inputs.train_dataset, inputs.item_counts, config.train, stopper, verbose=verbose)
    return model, stopper


def evaluate_on_test(inputs: TrainingInputs, model) -> dict[str, dict[str, float]]:
    """Test metrics of the towers and of popularity, full catalogue, earlier positives excluded."""
    from twotower.baselines import evaluate_popularity
    from twotower.evaluate import build_eval_set
    from twotower.train import evaluate_towers

    split = inputs.split
    test_set = build_eval_set(split.test, known_before_test(split), inputs.catalogue.item_ids)
    return {
        "two_tower": evaluate_towers(model, test_set, inputs.test_users, inputs.catalogue, inputs.schema),
        "popularity": evaluate_popularity(split.train, test_set, inputs.catalogue.item_ids),
    }


def save_training(config: RecipeConfig, inputs: TrainingInputs, model, stopper, results: dict) -> dict:
    """Both towers as SavedModels, catalogue item vectors, history, curves and metrics.json;
    the model folder is replaced whole, then the run manifest records the stage."""
    from merlin.schema import Tags

    from twotower.plots import plot_training
    from twotower.train import encode, save_history, save_item_vectors, save_tower

    item_vectors = encode(model.candidate_encoder, inputs.catalogue.features, inputs.schema.select_by_tag(Tags.ITEM))
    with atomic_dir(config.model_dir) as model_dir:
        query_dir, candidate_dir, vectors_path = (
            model_dir / path.relative_to(config.model_dir) for path in (config.query_tower_dir, config.candidate_tower_dir, config.item_vectors_path)
        )
        save_tower(model.query_encoder, query_dir)
        save_tower(model.candidate_encoder, candidate_dir)
        save_item_vectors(inputs.catalogue, item_vectors, vectors_path)
        save_history(stopper.history, model_dir / "history.json")
    with atomic_file(config.output_dir / "training_curves.png") as staging:
        plot_training(stopper.history, staging)
    metrics = {
        "dataset": config.data.dataset,
        "protocol": "full catalogue, earlier positives excluded, per-user temporal holdout",
        "test_users": int(inputs.split.test["user_id"].nunique()),
        "catalogue_items": int(len(inputs.catalogue.item_ids)),
        "best_epoch": stopper.best_epoch,
        "test": results,
        "history": stopper.history,
        "config": config_to_dict(config),
    }
    with atomic_file(config.metrics_path) as staging:
        staging.write_text(json.dumps(metrics, indent=2))
    record_stage(config, "train", inputs.consumed)
    return metrics


def run_train(config: RecipeConfig) -> dict:
    """Train the two-tower model, evaluate on the test split, save towers and metrics."""
    inputs = load_training_inputs(config)
    model, stopper = fit_two_tower(config, inputs)
    results = evaluate_on_test(inputs, model)
    metrics = save_training(config, inputs, model, stopper, results)
    print_metrics(results)
    return metrics


def saved_query_vectors(config: RecipeConfig, user_ids) -> np.ndarray:
    """Query vectors for dataset user ids from what is on disk, as the server computes them:
    features (history: everything before the test period) encoded by the saved user workflow,
    embedded by the query tower's serving signature."""
    from twotower.ensemble import call_signature, load_serving_signature

    data, split = load_recipe_data(config), load_split(config)
    users = encoded_users(config, data, known_before_test(split))
    return call_signature(load_serving_signature(config.query_tower_dir), users.loc[np.asarray(user_ids)])


def serving_side_metrics(config: RecipeConfig) -> dict[str, float]:
    """Test metrics through the saved query tower and the FAISS index (the served path)."""
    from twotower.evaluate import build_eval_set, evaluate_index
    from twotower.index import load_index
    from twotower.train import load_item_vectors

    split = load_split(config)
    catalogue_ids, _ = load_item_vectors(config.item_vectors_path)
    test_set = build_eval_set(split.test, known_before_test(split), catalogue_ids)
    vectors = saved_query_vectors(config, test_set.user_ids)
    return evaluate_index(load_index(config.index_path), vectors, test_set, catalogue_ids)


def print_metrics(results: dict[str, dict[str, float]]) -> None:
    names = list(next(iter(results.values())))
    print(f"{'model':<12}" + "".join(f"{n:>13}" for n in names))
    for model_name, values in results.items():
        print(f"{model_name:<12}" + "".join(f"{values[n]:>13.4f}" for n in names))


def run_index(config: RecipeConfig) -> None:
    from twotower.index import build_index, save_index
    from twotower.train import load_item_vectors

    with recorded_stage(config, "index"):
        item_ids, vectors = load_item_vectors(config.item_vectors_path)
        index = build_index(item_ids, vectors)
        save_index(index, config.index_path)
    print(f"[index] {type(faiss_base(index)).__name__} over {index.ntotal:,} items -> {config.index_path}")


def faiss_base(index):
    import faiss

    return faiss.downcast_index(index.index) if hasattr(index, "index") else index


class FeatureTables(NamedTuple):
    """What Feast serves (in ``build_feature_store``'s argument order)."""

    data: RecipeData
    users: pd.DataFrame  # raw profiles, latest history, every earlier positive
    encoded_users: pd.DataFrame  # the same users encoded by the saved user workflow
    workflow_fingerprint: str  # of that workflow, stored with the rows


def feature_tables(config: RecipeConfig) -> FeatureTables:
    """What Feast serves, from what is known before the test period."""
    workflow_fingerprint = fingerprint(config.workflow_dir)
    data, split = load_recipe_data(config), load_split(config)
    known = pd.concat([split.train, split.valid])
    users = user_rows(config, data, known)
    users = users.assign(seen_items=latest_history(known, users["user_id"].to_numpy(), None).to_numpy())
    return FeatureTables(data, users, encode_users(config, users), workflow_fingerprint)


def run_features(config: RecipeConfig) -> FeatureStore:
    """Build the run's Feast repository aside and swap it in; the store it returns is the new one."""
    from twotower.feature_store import build_feature_store

    with recorded_stage(config, "features"):
        store = build_feature_store(*feature_tables(config), config.feature_repo_dir, config.features)
    print(f"[features] Feast repository applied at {config.feature_repo_dir}, materialized into {config.features.online_store}")
    return store


def popular_items(config: RecipeConfig) -> tuple[np.ndarray, np.ndarray]:
    """Cold-start answer: catalogue items by training count, scores as a share of the top item's."""
    from twotower.train import load_item_vectors

    catalogue, _ = load_item_vectors(config.item_vectors_path)
    counts = load_split(config).train["item_id"].value_counts()
    counts = counts[counts.index.isin(catalogue)].head(config.serve.top_k)
    return counts.index.to_numpy(dtype=np.int64), (counts / counts.iloc[0]).to_numpy(dtype=np.float32)


def recipe_ensemble(config: RecipeConfig, feature_repo: Path | None = None):
    """The serving graph over this run's artifacts (``feature_repo`` defaults to the run's)."""
    from twotower.ensemble import build_ensemble

    return build_ensemble(
        feature_repo or config.feature_repo_dir,
        config.query_tower_dir,
        config.index_path,
        config.serve.top_k,
        popular_items(config),
        exclude_seen=config.serve.exclude_seen,
        max_users=config.serve.max_request_users,
        workflow_fingerprint=fingerprint(config.workflow_dir),
    )


def run_export(config: RecipeConfig) -> Path:
    """Check that the run's artifacts agree (``ArtifactMismatch`` names the stages to re-run),
    then write the model with its serving settings and the fingerprints it packaged."""
    from twotower.ensemble import export_ensemble
    from twotower.triton_config import apply_serving_settings

    packaged = check_export(config)

    def finish(model_dir: Path) -> None:
        apply_serving_settings(model_dir, config.serve)
        (model_dir / EXPORT_RECORD).write_text(json.dumps(packaged, indent=2, sort_keys=True))

    export_ensemble(recipe_ensemble(config), config.export_dir, config.serve.model_name, finish)
    print(f"[export] Triton model repository written to {config.export_dir}")
    return config.export_dir


def run_all(config: RecipeConfig) -> None:
    for stage in (run_data, run_workflow, run_train, run_index, run_features, run_export):
        stage(config)


def triton_server(config: RecipeConfig):
    from twotower.serve import TritonServer

    return TritonServer(config.export_dir, config.output_dir / "triton", config.serve)


def print_recommendations(config: RecipeConfig, user_ids: list[int], url: str | None = None) -> None:
    """Ask the server at ``url`` (default: the configured gRPC address) and print titles."""
    from twotower.client import recommend

    titles = load_recipe_data(config).items.set_index("item_id")["title"]
    url = url or f"{config.serve.host}:{config.serve.grpc_port}"
    answer = recommend(user_ids, url, config.serve.model_name, config.serve.client_timeout_s)
    for user_id, row_items, row_scores, fallback in zip(user_ids, answer["item_ids"], answer["scores"], answer["is_fallback"]):
        print(f"\nuser {user_id}{' (unknown: most popular items)' if fallback else ''}:")
        for rank, (item_id, score) in enumerate(zip(row_items, row_scores), start=1):
            print(f"  {rank:>2}. [{item_id:>5}] {titles.get(item_id, '?'):<60} {score:7.4f}")


def demo_users(config: RecipeConfig, count: int = 3) -> list[int]:
    return load_split(config).test["user_id"].drop_duplicates().head(count).astype(int).tolist()

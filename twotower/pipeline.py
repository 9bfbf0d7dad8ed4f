"""The recipe's stages wired together; each reads and writes under the output folder.

Stages: data -> workflow -> train -> index -> features -> export, then serve/query.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from twotower.config import RecipeConfig, config_to_dict
from twotower.data import RecipeData, Split, join_features, load_dataset, positives, split_by_time

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


# ---------------------------------------------------------------- stage helpers
def _save_frame(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)


def load_recipe_data(config: RecipeConfig) -> RecipeData:
    try:
        return RecipeData(*(pd.read_parquet(config.data_dir / f"{name}.parquet") for name in ("interactions", "users", "items")))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error.filename} missing: run the 'data' stage first") from error


def load_split(config: RecipeConfig) -> Split:
    return Split(*(pd.read_parquet(config.data_dir / "splits" / f"{name}.parquet") for name in SPLITS))


# ----------------------------------------------------------------------- stages
def run_data(config: RecipeConfig) -> Split:
    """Load the data set, keep positives, split by time, write everything as parquet."""
    dc = config.data
    data = load_dataset(dc.dataset, dc.synthetic_users, dc.synthetic_items, dc.synthetic_interactions_per_user, config.seed)
    split = split_by_time(positives(data.interactions, dc.min_rating), dc.test_fraction, dc.validation_fraction)
    for name, frame in (("interactions", data.interactions), ("users", data.users), ("items", data.items)):
        _save_frame(frame, config.data_dir / f"{name}.parquet")
    for name in SPLITS:
        _save_frame(getattr(split, name), config.data_dir / "splits" / f"{name}.parquet")
    print(
        f"[data] {dc.dataset}: {len(data.interactions):,} interactions, {len(data.users):,} users, "
        f"{len(data.items):,} items; positives train/valid/test = "
        f"{len(split.train):,}/{len(split.valid):,}/{len(split.test):,}"
    )
    return split


def run_workflow(config: RecipeConfig) -> None:
    """Fit the NVTabular workflow on the training split; write encoded training parquet."""
    from twotower.workflow import dask_execution, fit_workflow, save_workflows, transform_to_parquet

    data, split = load_recipe_data(config), load_split(config)
    train_rows = join_features(split.train, data)
    with dask_execution(config.workflow) as partitions:
        workflow = fit_workflow(train_rows, config.workflow_dir / "fit", partitions)
        save_workflows(workflow, config.workflow_dir)
        transform_to_parquet(workflow, train_rows, config.data_dir / "train_encoded", partitions)
    print(f"[workflow] fitted on {len(train_rows):,} training rows in {partitions} partition(s); saved to {config.workflow_dir}")


def _catalogue_and_users(config: RecipeConfig, data: RecipeData):
    """Catalogue and per-user features, encoded by the saved workflows (no refit)."""
    from twotower.train import Catalogue
    from twotower.workflow import category_table, load_workflow, transform_frame

    item_workflow = load_workflow(config.workflow_dir, "item")
    user_workflow = load_workflow(config.workflow_dir, "user")
    item_ids = np.sort(category_table(item_workflow, "item_id")["item_id"].to_numpy())
    items = data.items[data.items["item_id"].isin(item_ids)].sort_values("item_id")
    catalogue = Catalogue(item_ids=item_ids, features=transform_frame(item_workflow, items))
    users = transform_frame(user_workflow, data.users).set_index(data.users["user_id"].to_numpy())
    return catalogue, users


def run_train(config: RecipeConfig) -> dict:
    """Train the two-tower model, evaluate on the test split, save towers and metrics."""
    import merlin.io

    from twotower.evaluate import build_eval_set, evaluate_popularity
    from twotower.plots import plot_training
    from twotower.train import (
        FullCatalogueEarlyStopping,
        encode,
        evaluate_towers,
        item_frequencies,
        save_history,
        save_item_vectors,
        save_query_tower,
        set_seeds,
        train_model,
    )
    from twotower.workflow import category_table, load_workflow

    set_seeds(config.seed)
    data, split = load_recipe_data(config), load_split(config)
    train_dataset = merlin.io.Dataset(str(config.data_dir / "train_encoded"), engine="parquet")
    schema = train_dataset.schema
    catalogue, user_features = _catalogue_and_users(config, data)
    counts = item_frequencies(schema, category_table(load_workflow(config.workflow_dir, "item"), "item_id"))
    valid_set = build_eval_set(split.valid, split.train, catalogue.item_ids)
    stopper = FullCatalogueEarlyStopping(
        valid_set, user_features, catalogue, schema, config.train.early_stopping_metric, config.train.early_stopping_patience
    )
    model, history = train_model(train_dataset, counts, config.train, stopper)

    test_set = build_eval_set(split.test, pd.concat([split.train, split.valid]), catalogue.item_ids)
    results = {
        "two_tower": evaluate_towers(model, test_set, user_features, catalogue, schema),
        "popularity": evaluate_popularity(split.train, test_set, catalogue.item_ids),
    }
    config.model_dir.mkdir(parents=True, exist_ok=True)
    save_query_tower(model, config.model_dir / "query_tower")
    from merlin.schema import Tags

    item_vectors = encode(model.candidate_encoder, catalogue.features, schema.select_by_tag(Tags.ITEM))
    save_item_vectors(catalogue, item_vectors, config.model_dir / "item_vectors.npz")
    save_history(history, config.model_dir / "history.json")
    plot_training(history, config.output_dir / "training_curves.png")
    metrics = {
        "dataset": config.data.dataset,
        "protocol": "full catalogue, earlier positives excluded, per-user temporal holdout",
        "test_users": int(len(test_set.user_ids)),
        "catalogue_items": int(len(catalogue.item_ids)),
        "best_epoch": stopper.best_epoch,
        "test": results,
        "history": history,
        "config": config_to_dict(config),
    }
    config.metrics_path.write_text(json.dumps(metrics, indent=2))
    print_metrics(results)
    return metrics


def print_metrics(results: dict[str, dict[str, float]]) -> None:
    names = list(next(iter(results.values())))
    print(f"{'model':<12}" + "".join(f"{n:>13}" for n in names))
    for model_name, values in results.items():
        print(f"{model_name:<12}" + "".join(f"{values[n]:>13.4f}" for n in names))


def run_index(config: RecipeConfig) -> None:
    from twotower.index import build_index, save_index
    from twotower.train import load_item_vectors

    item_ids, vectors = load_item_vectors(config.model_dir / "item_vectors.npz")
    index = build_index(item_ids, vectors)
    save_index(index, config.index_path)
    print(f"[index] {type(faiss_base(index)).__name__} over {index.ntotal:,} items -> {config.index_path}")


def faiss_base(index):
    import faiss

    return faiss.downcast_index(index.index) if hasattr(index, "index") else index


def run_features(config: RecipeConfig) -> None:
    from twotower.feature_store import build_feature_store

    build_feature_store(load_recipe_data(config), config.feature_repo_dir, config.features)
    print(f"[features] Feast repository applied at {config.feature_repo_dir}, materialized into {config.features.online_store}")


def run_export(config: RecipeConfig) -> Path:
    from twotower.ensemble import build_ensemble, export_ensemble
    from twotower.triton_config import apply_serving_settings

    ensemble = build_ensemble(
        config.feature_repo_dir,
        config.workflow_dir / "user",
        config.model_dir / "query_tower",
        config.index_path,
        config.serve.top_k,
    )
    export_ensemble(ensemble, config.export_dir)
    apply_serving_settings(config.export_dir / config.serve.model_name, config.serve)
    print(f"[export] Triton model repository written to {config.export_dir}")
    return config.export_dir


def run_all(config: RecipeConfig) -> None:
    for stage in (run_data, run_workflow, run_train, run_index, run_features, run_export):
        stage(config)


def triton_server(config: RecipeConfig):
    from twotower.serve import TritonServer

    return TritonServer(config.export_dir, config.output_dir / "triton", config.serve)


def print_recommendations(config: RecipeConfig, user_ids: list[int]) -> None:
    from twotower.client import recommend

    titles = load_recipe_data(config).items.set_index("item_id")["title"]
    item_ids, scores = recommend(user_ids, f"{config.serve.host}:{config.serve.grpc_port}", config.serve.model_name)
    for user_id, row_items, row_scores in zip(user_ids, item_ids, scores):
        print(f"\nuser {user_id}:")
        for rank, (item_id, score) in enumerate(zip(row_items, row_scores), start=1):
            print(f"  {rank:>2}. [{item_id:>5}] {titles.get(item_id, '?'):<60} {score:7.4f}")


def demo_users(config: RecipeConfig, count: int = 3) -> list[int]:
    return load_split(config).test["user_id"].drop_duplicates().head(count).astype(int).tolist()

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
from twotower.data import (
    RecipeData,
    Split,
    join_features,
    load_dataset,
    positives,
    split_by_time,
    users_with_history,
)

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
    train_rows = join_features(split.train, data, config.train.history_length)
    with dask_execution(config.workflow) as partitions:
        workflow = fit_workflow(train_rows, config.workflow_dir / "fit", partitions)
        save_workflows(workflow, config.workflow_dir)
        transform_to_parquet(workflow, train_rows, config.data_dir / "train_encoded", partitions)
    print(f"[workflow] fitted on {len(train_rows):,} training rows in {partitions} partition(s); saved to {config.workflow_dir}")


def load_catalogue(config: RecipeConfig, data: RecipeData):
    """The fitted item vocabulary with item features encoded by the saved item workflow (no refit)."""
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
    return encode_users(config, user_rows(config, data, history_rows))


def run_train(config: RecipeConfig) -> dict:
    """Train the two-tower model, evaluate on the test split, save towers and metrics."""
    import merlin.io

    from twotower.baselines import evaluate_popularity
    from twotower.evaluate import build_eval_set
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
    catalogue = load_catalogue(config, data)
    vocabulary = category_table(load_workflow(config.workflow_dir, "item"), "item_id")
    counts = item_frequencies(schema, vocabulary, split.train["item_id"])
    valid_set = build_eval_set(split.valid, split.train, catalogue.item_ids)
    stopper = FullCatalogueEarlyStopping(
        valid_set,
        encoded_users(config, data, split.train),
        catalogue,
        schema,
        config.train.early_stopping_metric,
        config.train.early_stopping_patience,
    )
    model, history = train_model(train_dataset, counts, config.train, stopper)

    known = pd.concat([split.train, split.valid])
    test_set = build_eval_set(split.test, known, catalogue.item_ids)
    results = {
        "two_tower": evaluate_towers(model, test_set, encoded_users(config, data, known), catalogue, schema),
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


def serving_side_metrics(config: RecipeConfig) -> dict[str, float]:
    """Test metrics through the saved query tower and the FAISS index (the served path)."""
    from merlin.table import TensorTable

    from twotower.ensemble import PredictQueryTower
    from twotower.evaluate import build_eval_set, evaluate_index
    from twotower.index import load_index
    from twotower.train import load_item_vectors

    data, split = load_recipe_data(config), load_split(config)
    known = pd.concat([split.train, split.valid])
    catalogue_ids, _ = load_item_vectors(config.model_dir / "item_vectors.npz")
    test_set = build_eval_set(split.test, known, catalogue_ids)
    users = encoded_users(config, data, known).loc[test_set.user_ids].reset_index(drop=True)
    tower = PredictQueryTower(config.model_dir / "query_tower")
    vectors = np.asarray(tower.transform(None, TensorTable.from_df(users))[PredictQueryTower.output_name].values)
    return evaluate_index(load_index(config.index_path), vectors, test_set, catalogue_ids)


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


def feature_tables(config: RecipeConfig) -> tuple[RecipeData, pd.DataFrame, pd.DataFrame]:
    """What Feast serves, from what is known before the test period: raw profiles with the
    latest history and every earlier positive, and the same users encoded by the saved workflow."""
    data, split = load_recipe_data(config), load_split(config)
    known = pd.concat([split.train, split.valid])
    users = user_rows(config, data, known)
    seen = known.groupby("user_id")["item_id"].agg(list)
    users = users.assign(seen_items=seen.reindex(users["user_id"]).map(lambda v: v if isinstance(v, list) else []).to_numpy())
    return data, users, encode_users(config, users)


def run_features(config: RecipeConfig) -> None:
    from twotower.feature_store import build_feature_store

    build_feature_store(*feature_tables(config), config.feature_repo_dir, config.features)
    print(f"[features] Feast repository applied at {config.feature_repo_dir}, materialized into {config.features.online_store}")


def popular_items(config: RecipeConfig) -> tuple[np.ndarray, np.ndarray]:
    """Cold-start answer: catalogue items by training count, scores as a share of the top item's."""
    from twotower.train import load_item_vectors

    catalogue, _ = load_item_vectors(config.model_dir / "item_vectors.npz")
    counts = load_split(config).train["item_id"].value_counts()
    counts = counts[counts.index.isin(catalogue)].head(config.serve.top_k)
    return counts.index.to_numpy(dtype=np.int64), (counts / counts.iloc[0]).to_numpy(dtype=np.float32)


def recipe_ensemble(config: RecipeConfig, feature_repo: Path | None = None):
    """The serving graph over this run's artifacts (``feature_repo`` defaults to the run's)."""
    from twotower.ensemble import build_ensemble

    return build_ensemble(
        feature_repo or config.feature_repo_dir,
        config.model_dir / "query_tower",
        config.index_path,
        config.serve.top_k,
        popular_items(config),
        exclude_seen=config.serve.exclude_seen,
        max_users=config.serve.max_request_users,
    )


def run_export(config: RecipeConfig) -> Path:
    from twotower.ensemble import export_ensemble
    from twotower.triton_config import apply_serving_settings

    export_ensemble(recipe_ensemble(config), config.export_dir, config.serve.model_name)
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
    answer = recommend(user_ids, f"{config.serve.host}:{config.serve.grpc_port}", config.serve.model_name)
    for user_id, row_items, row_scores, fallback in zip(user_ids, answer["item_ids"], answer["scores"], answer["is_fallback"]):
        print(f"\nuser {user_id}{' (unknown: most popular items)' if fallback else ''}:")
        for rank, (item_id, score) in enumerate(zip(row_items, row_scores), start=1):
            print(f"  {rank:>2}. [{item_id:>5}] {titles.get(item_id, '?'):<60} {score:7.4f}")


def demo_users(config: RecipeConfig, count: int = 3) -> list[int]:
    return load_split(config).test["user_id"].drop_duplicates().head(count).astype(int).tolist()

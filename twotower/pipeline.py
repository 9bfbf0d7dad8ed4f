"""The recipe's stages wired together; each reads and writes under the output folder.

Stages: data -> workflow -> train -> index -> features -> export, then serve/query.
Each stage writes its outputs atomically and records what it consumed and produced in
the run manifest; the export refuses parts that come from different runs (manifest.py).
The work of each stage lives in its own module; this file only wires them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from twotower.config import ConfigError, RecipeConfig, prerank_config
from twotower.console import held_back_output, timed_step
from twotower.models import check_retriever, head_shape
from twotower.models.multi_vector import HeadIndex, exact_top_k, overlap_at_k
from twotower.stages.data import (
    check_split,
    data_cutoff,
    join_features,
    known_before,
    load_dataset,
    positive_threshold,
    positives,
    split_by_time,
    with_logged_events,
)
from twotower.stages.evaluate import validation_query_vectors
from twotower.stages.index import build_index, print_choice
from twotower.store.artifacts import SPLITS, RecipeData, Split, load_item_vectors, load_recipe_data, load_split
from twotower.store.atomic import atomic_dir, atomic_file
from twotower.store.events import EventLog, deploy_live_store
from twotower.store.index import save_index
from twotower.store.manifest import EXPORT_RECORD, check_export, check_prerank, recorded_stage

if TYPE_CHECKING:  # heavy imports stay lazy: the CLI loads TensorFlow only for stages that need it
    from feast import FeatureStore


def _save_frame(frame: pd.DataFrame, path: Path) -> None:
    with atomic_file(path) as staging:
        frame.to_parquet(staging, index=False)


def prepare_data(config: RecipeConfig) -> tuple[RecipeData, Split]:
    """The data set as known at ``data.until``, with the run's event log as interactions beside its
    own (``with_logged_events``), its positives split by time; nothing is written (everything is
    read and checked first)."""
    dc = config.data
    logged = EventLog(config.events_dir).read()
    data = known_before(with_logged_events(load_dataset(dc, config.seed), logged, dc), data_cutoff(dc))
    split = split_by_time(
        positives(data.interactions, positive_threshold(dc)), dc.test_fraction, dc.validation_fraction
    )
    check_split(split, dc)
    return data, split


def write_data(config: RecipeConfig, data: RecipeData, split: Split) -> None:
    """The data stage's outputs, recorded with the cutoff they were taken at."""
    dc = config.data
    with recorded_stage(config, "data") as details:
        details["until"] = data_cutoff(dc)
        for name, frame in (("interactions", data.interactions), ("users", data.users), ("items", data.items)):
            _save_frame(frame, config.data_dir / f"{name}.parquet")
        with atomic_dir(config.splits_dir) as splits_dir:
            for name in SPLITS:
                getattr(split, name).to_parquet(splits_dir / f"{name}.parquet", index=False)
    print(
        f"[data] {dc.dataset}{f' before {dc.until}' if dc.until != '' else ''}: "
        f"{len(data.interactions):,} interactions, "
        f"{len(data.users):,} users, {len(data.items):,} items; positives train/valid/test = "
        f"{len(split.train):,}/{len(split.valid):,}/{len(split.test):,}"
    )


def run_data(config: RecipeConfig) -> Split:
    """Load the data set (up to ``data.until``), keep positives, split by time, write everything as parquet."""
    data, split = prepare_data(config)
    write_data(config, data, split)
    return split


def run_workflow(config: RecipeConfig, refit: bool = True) -> None:
    """Fit the NVTabular workflow on the training split; write encoded training parquet.

    ``refit`` False (``twotower retrain`` with train.new_ids=oov) keeps the saved workflow as it
    is and encodes the current training split with it: ids it was not fitted on get Categorify's
    out-of-vocabulary code, and the model's embedding tables keep their shapes."""
    from twotower.stages.workflow import (
        FULL_WORKFLOW,
        dask_execution,
        fit_workflow,
        load_workflow,
        save_workflows,
        transform_to_parquet,
    )

    with recorded_stage(config, "workflow") as details:
        details["vocabulary"] = "fitted" if refit else "kept (train.new_ids=oov)"
        data, split = load_recipe_data(config.data_dir), load_split(config.splits_dir)
        train_rows = join_features(split.train, data, config.data.schema, config.train.history_length)
        if refit:
            # Both folders are built aside and swapped in at the end: the fitted vocabularies
            # (fit/) and the encoded rows are only replaced together with the saved workflows.
            with (
                dask_execution(config.workflow) as partitions,
                atomic_dir(config.workflow_dir) as workflow_dir,
                atomic_dir(config.train_encoded_dir) as encoded_dir,
            ):
                workflow = fit_workflow(train_rows, config.data.schema, workflow_dir / "fit", partitions)
                save_workflows(workflow, workflow_dir)
                transform_to_parquet(workflow, train_rows, encoded_dir, partitions)
        else:
            with dask_execution(config.workflow) as partitions, atomic_dir(config.train_encoded_dir) as encoded_dir:
                transform_to_parquet(
                    load_workflow(config.workflow_dir, FULL_WORKFLOW), train_rows, encoded_dir, partitions
                )
    what = "fitted on" if refit else "kept (not refitted); it encoded"
    print(
        f"[workflow] {what} {len(train_rows):,} training rows in {partitions} partition(s); "
        f"saved in {config.workflow_dir}"
    )


def run_train(config: RecipeConfig) -> dict:
    """Train the configured model, evaluate on the test split, save towers and metrics."""
    from twotower.stages.train import print_metrics, train_and_save

    _, metrics = train_and_save(config)
    print("[train] test split, whole catalogue ranked, earlier positives excluded:")
    print_metrics(metrics["test"])
    return metrics


def run_index(config: RecipeConfig) -> None:
    """Build the configured index kind (``auto``: the fastest that meets ``index.min_recall``),
    measured on validation users' query vectors; the choice and its recall go in the manifest.
    A multi-vector model's index holds every item head instead (``_index_heads``)."""

    check_retriever(config.model)
    with recorded_stage(config, "index") as details:
        item_ids, vectors = load_item_vectors(config.item_vectors_path)
        queries = validation_query_vectors(config)
        if head_shape(config.model):
            details["index"] = _index_heads(config, item_ids, vectors, queries)
            return
        index, choice = build_index(item_ids, vectors, config.index, queries, config.serve.top_k, config.seed)
        save_index(index, config.index_path)
        details["index"] = choice.as_record()
    print_choice(choice)
    print(f"[index] {choice.chosen.factory} over {index.ntotal:,} items -> {config.index_path}")


def _index_heads(config: RecipeConfig, item_ids, vectors, queries) -> dict:
    """Every item head of a multi-vector model in one exact inner-product index (the served
    retriever's, ``multi_vector.HeadIndex``); how much of the exact FE top 100 of the validation
    queries it finds at ``model.inttower.search_depth`` is measured and recorded."""

    shape, depth = head_shape(config.model), config.model.inttower.search_depth
    heads = HeadIndex.build(item_ids, shape.items(vectors))
    k = min(100, heads.ntotal)
    found, _ = heads.search(shape.query(queries), k, depth)
    overlap = overlap_at_k(found, exact_top_k(heads, shape.query(queries), k), k)
    save_index(heads.index, config.index_path)
    print(
        f"[index] every head of {heads.ntotal:,} items ({heads.index.ntotal:,} rows, exact inner product) "
        f"-> {config.index_path}"
    )
    print(
        f"[index] multi-vector search at depth {depth} finds {overlap:.4f} of the exact FE top {k} "
        f"({len(queries)} validation users)"
    )
    return {
        "kind": "multi_vector",
        "rows": int(heads.index.ntotal),
        "search_depth": depth,
        f"overlap@{k}": overlap,
        "queries": len(queries),
    }


def run_features(config: RecipeConfig) -> FeatureStore:
    """Build the run's Feast repository aside and swap it in; the store it returns is the new one."""
    from twotower.stages.features import build_feature_store, feature_tables

    with recorded_stage(config, "features"):
        # Feast prints a banner and a progress bar per feature view while it materializes.
        with held_back_output():
            store = build_feature_store(feature_tables(config), config.feature_repo_dir, config.features)
    print(
        f"[features] Feast repository applied at {config.feature_repo_dir}, "
        f"materialized into {config.features.online_store}"
    )
    return store


def export_checks(config: RecipeConfig) -> dict[str, str]:
    """Refuse artifacts of different runs (``ArtifactMismatch``), here and in the pre-ranker's
    run; the fingerprints the export packages."""
    return {**check_export(config), **check_prerank(config)}


RUN_INPUTS = ("data", "workflows", "manifest.json")  # what a derived run copies: data, split, workflow


def copy_run_inputs(source: RecipeConfig, target: RecipeConfig) -> None:
    """Make ``target.output_dir`` afresh with a copy of ``source``'s data, split and fitted workflow
    (and the manifest recording them), so a second model trains on exactly this run's inputs."""
    if target.output_dir.exists():
        shutil.rmtree(target.output_dir)
    target.output_dir.mkdir(parents=True)
    for part in RUN_INPUTS:
        path = source.output_dir / part
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, target.output_dir / part)


def run_prerank(config: RecipeConfig) -> dict:
    """Train ``serve.prerank_model`` as the cascade's pre-ranker in ``<output_dir>/prerank``, on a
    copy of this run's data and workflow; ``twotower export`` with ``serve.prerank_candidates``
    then serves retrieval followed by it."""
    if config.serve.prerank_run is not None:
        raise ConfigError(
            "serve.prerank_run names a pre-ranker trained elsewhere; "
            "`twotower prerank` trains into <output_dir>/prerank only"
        )
    ranker = prerank_config(config)
    copy_run_inputs(config, ranker)
    print(f"[prerank] training {ranker.model.name} in {ranker.output_dir}")
    return run_train(ranker)


def run_export(config: RecipeConfig) -> Path:
    """Check that the model is served and the run's artifacts agree (``export_checks``),
    then write the model with its serving settings and the fingerprints it packaged."""
    from twotower.serving.events import export_events_model
    from twotower.serving.export import export_ensemble
    from twotower.serving.graph import load_external_ids, recipe_ensemble

    packaged = export_checks(config)
    deploy_live_store(config.events_dir, config.features)
    external_ids = load_external_ids(config)
    export_ensemble(
        recipe_ensemble(config),
        config.export_dir,
        config.serve,
        lambda model_dir: _write_export_record(model_dir, packaged),
    )
    text_ids = {"user_id": external_ids.user_codes is not None, "item_id": external_ids.item_names is not None}
    export_events_model(config.export_dir, config.events_dir, text_ids, config.serve.max_event_rows)
    print(f"[export] Triton model repository written to {config.export_dir}")
    return config.export_dir


STAGES: dict[str, Callable[[RecipeConfig], Any]] = {
    "data": run_data,
    "workflow": run_workflow,
    "train": run_train,
    "index": run_index,
    "features": run_features,
    "export": run_export,
}


def run_stage(name: str, config: RecipeConfig) -> Any:
    """One stage by name; its last line says how long it took."""
    with timed_step(name):
        return STAGES[name](config)


def run_export_version(config: RecipeConfig) -> int:
    """The export's checks and graph, written as the next version of the exported model beside the
    one a server may be serving (refresh-items); its number. The fingerprints record follows it."""
    from twotower.serving.export import export_version
    from twotower.serving.graph import recipe_ensemble

    packaged = export_checks(config)
    version = export_version(recipe_ensemble(config), config.export_dir, config.serve.model_name)
    _write_export_record(config.export_dir / config.serve.model_name, packaged)
    print(f"[export] version {version} of {config.serve.model_name} written to {config.export_dir}")
    return version


def _write_export_record(model_dir: Path, packaged: dict[str, str]) -> None:
    with atomic_file(model_dir / EXPORT_RECORD) as staging:
        staging.write_text(json.dumps(packaged, indent=2, sort_keys=True))


def run_all(config: RecipeConfig) -> None:
    check_retriever(config.model)  # before training a model the index stage would refuse
    for name in STAGES:
        run_stage(name, config)


def run_summary(config: RecipeConfig) -> str:
    """Where a run's outputs are, for a person to open next."""
    rows = [
        (
            "artifacts",
            (
                f"{config.output_dir} ({config.manifest_path.name}: what each stage made; "
                f"{config.metrics_path.name}: test metrics)"
            ),
        ),
        *(("plot", str(plot)) for plot in sorted(config.output_dir.rglob("*.png"))),
        ("Triton model repository", f"{config.export_dir} (model {config.serve.model_name})"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(
        [
            "outputs:",
            *(f"  {name:<{width}}  {where}" for name, where in rows),
            "next, with the same --config/--set: twotower serve; twotower query --user ID; "
            "twotower recommend --users all --out FILE",
        ]
    )

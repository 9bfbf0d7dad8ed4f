"""Keep it fresh: ``twotower retrain --since TIME`` warm-starts from the last model on the new interactions.

The run's configuration says how far the data goes (``data.until``: interactions at or after it
are not known yet; "" is everything the data set holds). The new interactions are the positives
with ``since <= timestamp < until``. Retrain runs the stages again, each recorded in the run
manifest as the pipeline records them, so ``twotower export`` accepts the result:

1. ``data``: the data set as known at ``until``, with the run's event log (``twotower events``
   and the served ``record_events`` model) as interactions beside its own, split per user by
   time as always;
2. ``workflow``, by ``train.new_ids``:
   - ``oov`` (the warm start): the saved workflow is kept, not refitted, and encodes the new
     split. New users and new items get Categorify's out-of-vocabulary code, so the embedding
     tables keep their shapes and the last model's weights load as they are. New items stay out
     of the catalogue (it is the fitted vocabulary) until a refit, or ``refresh-items``;
   - ``refit``: the workflow is fitted again; the vocabularies, hence the embedding tables,
     change, so the model is trained from scratch (``train.epochs``): a full retrain;
3. ``train`` (oov): the configured model is built as the train stage builds it, the last model's
   weights (``model/weights.npz``) are loaded, and it is trained ``train.retrain_epochs`` epochs
   on the new positives of the training split (each user's latest positives stay held out for
   validation and test, as in the train stage), plus ``train.retrain_replay`` older training
   positives per new one, drawn at random. The best validation epoch is kept and scored on the
   test split, as the train stage does; the manifest records which weights it started from;
4. ``index``: rebuilt over the re-embedded catalogue; then the items refresh-items had added are
   added back, embedded by the retrained item tower (``carry_refreshed_items``);
5. ``features`` (oov): the Feast rows of the users whose positives changed, of the users who
   are new and of the users with logged events the rows do not hold yet are rewritten in place
   (offline source and online store); the other rows are still what a full build would write.
   A profile changed in the data set's user file for a user with no new positive is not picked
   up: run ``twotower features``. With refit, or when the items table changed, the whole
   repository is built again;
6. with a pre-ranking stage (``serve.prerank_candidates``), the run's pre-ranker is trained
   again by ``twotower prerank`` on the new data (from scratch, ``train.epochs``): the one
   trained on the old split would be refused by the export. A pre-ranker trained elsewhere
   (``serve.prerank_run``) cannot follow the new data, and items added by refresh-items are not
   in a pre-ranker's catalogue: both are refused before anything changes;
7. the run is exported as the next version of the Triton model and rolled out to the running
   servers exactly as ``refresh-items`` rolls out (``refresh.roll_out_new_version``); without an
   exported model yet, the export stage runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from twotower.config import RecipeConfig
from twotower.console import timed_step
from twotower.lifecycle.refresh import add_new_items, refreshed_items, roll_out_new_version, served_run_lock
from twotower.stages.data import data_cutoff, latest_history
from twotower.store.artifacts import load_item_vectors, load_recipe_data
from twotower.store.manifest import check_export, fingerprint, fingerprints, read_manifest, recorded_stage

if TYPE_CHECKING:  # TensorFlow loads only when retrain runs
    from twotower.stages.train import TrainingInputs


class RetrainRefused(ValueError):
    """retrain will not run on this run or window; nothing was changed."""


@dataclass
class RetrainReport:
    policy: str  # train.new_ids
    new_positives: int  # positives with since <= timestamp < until
    trained_positives: int  # of those, in the training split: what the warm start trains on
    replayed: int  # older training positives trained on with them
    changed_users: int  # users whose Feast rows were rewritten (new users among them)
    new_users: int
    version: int  # of the exported model now
    servers: list[str]  # gRPC addresses of the servers serving that version


def new_training_rows(inputs: TrainingInputs, since: int, replay: float, seed: int) -> tuple[TrainingInputs, int, int]:
    """``inputs`` narrowed to the training positives at or after ``since``
    plus ``replay`` older training positives per new one, drawn at random; the logQ correction's
    item counts follow the rows kept (they are what the batches hold). Also returns how many rows
    are new and how many replayed."""
    import merlin.io

    from twotower.stages.train import item_frequencies

    timestamps = inputs.split.train["timestamp"].to_numpy()
    new, older = np.flatnonzero(timestamps >= since), np.flatnonzero(timestamps < since)
    replayed = np.random.default_rng(seed).choice(older, min(len(older), round(replay * len(new))), replace=False)
    rows = np.sort(np.concatenate([new, replayed]))
    # The workflow stage encodes the training split row for row, in its order.
    encoded = inputs.train_dataset.to_ddf().compute().reset_index(drop=True)
    kept = np.zeros(len(timestamps), bool)
    kept[rows] = True
    sequence_targets = None
    if inputs.sequence_users is not None:  # whole sequences: every history is read, the kept positions trained
        flagged = inputs.split.train.assign(kept=kept)
        sequence_targets = latest_history(flagged, inputs.sequence_users.index.to_numpy(), None, column="kept")
    narrowed = dataclasses.replace(
        inputs,
        train_dataset=merlin.io.Dataset(encoded.iloc[rows].reset_index(drop=True), schema=inputs.schema),
        item_counts=item_frequencies(inputs.schema, inputs.item_vocabulary, inputs.split.train["item_id"].iloc[rows]),
        sequence_targets=sequence_targets,
    )
    return narrowed, len(new), len(replayed)


def warm_start(config: RecipeConfig, since: int) -> int:
    """The train stage from the last model's weights on the new training positives (module
    docstring, step 3); how many older positives were replayed."""
    from twotower.stages.train import evaluate_on_test, fit_model, load_training_inputs, print_metrics, save_training

    inputs = load_training_inputs(config)
    narrowed, new, replayed = new_training_rows(inputs, since, config.train.retrain_replay, config.seed)
    started_from = fingerprint(config.model_weights_path)
    print(
        f"[train] warm start from {config.model_weights_path} ({started_from[:12]}): {new:,} new training positives, "
        f"{replayed:,} older ones replayed, {config.train.retrain_epochs} epoch(s)",
        flush=True,
    )
    model, stopper = fit_model(
        config, narrowed, epochs=config.train.retrain_epochs, warm_start=config.model_weights_path
    )
    details = {
        "warm_start": {
            "model_weights": started_from,
            "since": since,
            "until": data_cutoff(config.data),
            "new_positives": new,
            "replayed": replayed,
            "epochs": config.train.retrain_epochs,
        }
    }
    metrics = save_training(config, narrowed, model, stopper, evaluate_on_test(config, inputs, model), details)
    print("[train] test split, whole catalogue ranked, earlier positives excluded:")
    print_metrics(metrics["test"])
    return replayed


def rewrite_user_rows(config: RecipeConfig, user_ids: np.ndarray) -> None:
    """The features stage for ``user_ids`` only (module docstring, step 5)."""
    from twotower.stages.features import update_users

    with recorded_stage(config, "features"):
        if len(user_ids):
            update_users(config, user_ids)
    print(
        f"[features] rows of {len(user_ids):,} users rewritten in {config.feature_repo_dir} "
        f"({config.features.online_store})"
    )


def carry_refreshed_items(config: RecipeConfig, items: pd.DataFrame) -> None:
    """Add the items refresh-items had added before the retrain (``items``) to the retrained
    catalogue, embedded by the retrained item tower, as refresh-items adds them; those that are in
    the catalogue now (a refit's vocabulary holds the items that have training positives since)
    have trained vectors and are left as they are."""

    items = items[~items["item_id"].isin(load_item_vectors(config.item_vectors_path)[0])]
    if len(items):
        catalogue_size = add_new_items(items, config)
        print(
            f"[retrain] {len(items):,} items added by refresh-items embedded again by the retrained item tower; "
            f"the index holds {catalogue_size:,} items"
        )


def _store_has_current_items(config: RecipeConfig) -> bool:
    """Whether the Feast repository was built from the items table and workflow on disk now."""
    consumed = read_manifest(config).get("features", {}).get("consumed", {})
    current = fingerprints(config, ("items", "workflow"))
    return all(consumed.get(name) == value for name, value in current.items())


def _check_window(config: RecipeConfig, since: int, until: int | None) -> None:
    """RetrainRefused for a window that is empty or leaves a gap after what the run knew."""
    if until is not None and since >= until:
        raise RetrainRefused(f"--since {since} is not before data.until {until}: no interaction can be new")
    known_until = read_manifest(config).get("data", {}).get("details", {}).get("until")
    if known_until is not None and until is not None and until < known_until:
        raise RetrainRefused(
            f"data.until {until} is before the run's data cutoff {known_until}: retrain moves forward in time"
        )
    if known_until is not None and since > known_until:
        raise RetrainRefused(
            f"--since {since} is after the run's data cutoff {known_until}: the positives in between would be neither "
            f"trained on nor served; use --since {known_until} or earlier"
        )


def retrain(config: RecipeConfig, since: int) -> RetrainReport:
    """``twotower retrain`` (module docstring). RetrainRefused or ArtifactMismatch before anything
    changes; ``refresh.RolloutFailed`` if a server did not load the new version."""
    from twotower.pipeline import prepare_data, run_prerank, run_stage, run_workflow, write_data
    from twotower.serving.export import model_versions
    from twotower.stages.features import users_with_events_not_held

    policy = config.train.new_ids
    cascade = config.serve.prerank_candidates > 0
    if cascade and config.serve.prerank_run is not None:
        raise RetrainRefused(
            f"serve.prerank_run={config.serve.prerank_run}: "
            "a pre-ranker trained elsewhere cannot follow this run's new data; "
            "unset it to have retrain train the run's own pre-ranker"
        )
    with served_run_lock(config):
        _check_window(config, since, data_cutoff(config.data))
        if policy == "oov":
            if not config.model_weights_path.exists():
                raise RetrainRefused(
                    f"no saved model weights at {config.model_weights_path} to warm-start from: "
                    "run `twotower train` first"
                )
            check_export(config)  # the last model must be the one its workflow and data belong to
        known = load_recipe_data(config.data_dir)
        known_users = known.users["user_id"].to_numpy()
        refreshed = refreshed_items(config, list(known.items.columns))  # read before the stages below drop them
        if cascade and len(refreshed):
            raise RetrainRefused(
                f"{len(refreshed)} items added by refresh-items are served, "
                "and a pre-ranker's catalogue holds the items it was "
                "trained on only; run the pipeline again, or retrain with serve.prerank_candidates=0"
            )
        data, split = prepare_data(config)
        positives = pd.concat([split.train, split.valid, split.test])
        fresh = positives[positives["timestamp"] >= since]
        trained = int((split.train["timestamp"] >= since).sum())
        if trained == 0:
            raise RetrainRefused(
                f"no new positives at or after --since {since} in the training split ({len(fresh):,} in all): "
                "nothing to train on"
            )
        new_users = np.setdiff1d(data.users["user_id"].to_numpy(), known_users)
        changed_users = np.union1d(
            np.union1d(fresh["user_id"].unique(), new_users), users_with_events_not_held(config, data)
        )
        print(
            f"[retrain] {len(fresh):,} new positives ({trained:,} in the training split), "
            f"{len(new_users):,} new users; train.new_ids={policy}"
        )

        with timed_step("data"):
            write_data(config, data, split)
        replayed = 0
        if policy == "refit":
            print(
                "[retrain] train.new_ids=refit: the workflow is fitted again, which changes the embedding tables, "
                "so this is a full retrain from scratch (train.epochs), not a warm start"
            )
            for stage in ("workflow", "train", "index", "features"):
                run_stage(stage, config)
        else:
            with timed_step("workflow"):
                run_workflow(config, refit=False)
            with timed_step("train"):
                replayed = warm_start(config, since)
            run_stage("index", config)
            if _store_has_current_items(config):
                with timed_step("features"):
                    rewrite_user_rows(config, changed_users)
            else:
                run_stage("features", config)

        carry_refreshed_items(config, refreshed)
        if cascade:
            with timed_step("prerank"):
                run_prerank(config)
        model_dir = config.export_dir / config.serve.model_name
        if (model_dir / "config.pbtxt").exists():
            version, servers = roll_out_new_version(config, "retrain")
        else:
            run_stage("export", config)
            version, servers = model_versions(model_dir)[-1], []
    return RetrainReport(policy, len(fresh), trained, replayed, len(changed_users), len(new_users), version, servers)

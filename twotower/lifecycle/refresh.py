"""Keep it fresh: new catalogue items served without retraining and without restarting Triton.

``twotower refresh-items --items new.parquet`` takes items that have features but no
interactions yet, with the columns of the run's item table, and

1. encodes them with the saved item workflow (no refit);
2. embeds them with the saved item tower (its serving signature);
3. adds them to the saved item vectors and to the FAISS index, without a rebuild (every kind;
   an IVF index files them under its trained centroids);
4. adds their rows to Feast's ``item_features`` view (offline source and online store);
5. records the refresh in the run manifest, so that ``export`` accepts the refreshed run;
6. writes the run's serving graph as the next version of the exported model, beside the one
   being served; and
7. has every running server that the recipe started on this model repository load it.

**What cold start means here.** The ``item_id`` vocabulary was fitted on training interactions,
so a new item's id is not in it: NVTabular's Categorify maps it, like any unseen value, to the
column's out-of-vocabulary code (2), and a feature value never seen in training (a new genre, a
later year) gets its own column's out-of-vocabulary code too. No training row has an
out-of-vocabulary item id, so that row of the id embedding table is still as it was initialised.
The item tower therefore sees one id embedding shared by every new item, never trained, plus the
item's real features: where a new item ranks comes from its features alone.

**Rollout.** Triton runs with explicit model control and the default version policy (the newest
version only). Loading the model again while version N is served loads N+1 in the background;
N answers every request until N+1 is ready. Then new requests go to N+1, and N is unloaded once
the requests it is answering have completed (Triton's model management documentation: a reload
replaces the model "without any loss in availability"; its core's model lifecycle keeps the old
version alive while requests hold it). A request is answered by one version, so by one query
tower, one index and one copy of the Feast repository (the export copies it into each version,
``feature_store.served_copy``): the refreshed item rows reach requests with the new version only.

**Refusals.** An unreadable or empty file, a missing column, a bad value, a repeated id, a
negative id (FAISS reserves -1) and an id already in the catalogue are refused with one line
before anything changes. Ids already in the catalogue are refused rather than updated: their
trained vectors would be replaced by cold-start ones, and an HNSW index cannot remove items.
Changing an item's features means re-running the pipeline. A run served with a pre-ranking stage
(``serve.prerank_candidates``) is refused too: its pre-ranker's item vectors cover the items it
was trained on only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow

from twotower.config import RecipeConfig
from twotower.stages.data import as_numbers, side_table
from twotower.store.artifacts import (
    EXTERNAL_ID,
    DataError,
    ServingSignature,
    call_signature,
    has_text_ids,
    load_item_vectors,
    load_recipe_data,
    save_item_vectors,
)
from twotower.store.atomic import atomic_file, exclusive_lock
from twotower.store.manifest import (
    REFRESH,
    REFRESHED,
    check_export,
    fingerprints,
    read_manifest,
    record_refresh,
    refresh_in_effect,
    require_a_run,
)

SHOWN_IDS = 5  # ids named in a refusal


class RefreshRefused(ValueError):
    """refresh-items will not run on this input or run; nothing was changed."""


class RolloutFailed(RuntimeError):
    """The refreshed version was written, but a server did not load it (it serves the previous one)."""


@dataclass
class RefreshReport:
    catalogue_size: int  # items in the index afterwards
    version: int  # of the exported model
    servers: list[str]  # gRPC addresses of the servers now serving that version


def _some(ids: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:SHOWN_IDS])
    return shown + (f" and {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else "")


def read_new_items(path: Path, config: RecipeConfig) -> pd.DataFrame:
    """The items in the parquet file ``path``, with the columns of the run's item table typed as
    the data stage types them (other columns are dropped). RefreshRefused, in one line, for a
    file that cannot be read or has no rows, a missing column, a bad value, or an id that is
    repeated or negative."""
    try:
        frame = pd.read_parquet(path)
    except (OSError, pyarrow.ArrowException) as error:
        raise RefreshRefused(f"{path}: not a readable parquet file ({str(error).splitlines()[0]})") from None
    if frame.empty:
        raise RefreshRefused(f"{path} has no rows")
    run_items = load_recipe_data(config.data_dir).items
    expected = list(run_items.columns)
    missing = [column for column in expected if column not in frame.columns]
    if missing:
        raise RefreshRefused(
            f"{path} lacks the column(s) {', '.join(missing)} of the run's item table ({', '.join(expected)})"
        )
    repeated = frame["item_id"][frame["item_id"].duplicated()].unique()
    if len(repeated):
        raise RefreshRefused(f"{path}: item ids appear more than once: {_some(repeated)}")
    schema = config.data.schema
    try:  # the declared item features, typed as the data stage types them
        table = side_table(frame, "item_id", schema.item_features, schema.list_separator, str(path))
    except DataError as error:
        raise RefreshRefused(str(error)) from None
    if has_text_ids(table[EXTERNAL_ID]):
        raise RefreshRefused(f"{path}: refresh-items takes integer item ids; this file's are text")
    for column in schema.item_features:  # the saved workflow encodes each column as the run typed it
        if pd.api.types.is_numeric_dtype(run_items[column]):
            try:
                as_numbers(table[column], str(path), column)
            except DataError as error:
                raise RefreshRefused(str(error)) from None
    items = table.assign(item_id=table[EXTERNAL_ID])[expected]
    ids = items["item_id"]
    negative = ids[ids < 0].to_numpy()
    if len(negative):
        raise RefreshRefused(f"{path}: item ids must not be negative (the index reserves -1): {_some(negative)}")
    return items


def refuse_catalogued(items: pd.DataFrame, catalogue_ids: np.ndarray) -> None:
    """RefreshRefused if any of ``items`` is already in the catalogue (the index)."""
    known = items["item_id"][items["item_id"].isin(catalogue_ids)].to_numpy()
    if len(known):
        raise RefreshRefused(
            f"{len(known)} of the item ids are already in the catalogue: {_some(known)}; refresh-items adds new "
            f"items only (to change an item's features, run the pipeline again)"
        )


def embed_items(items: pd.DataFrame, config: RecipeConfig) -> np.ndarray:
    """Item-tower vectors of ``items``, in order: features encoded by the saved item workflow (no
    refit; unseen values get the out-of-vocabulary code), then the saved item tower."""
    from twotower.stages.workflow import ITEM_SUBGRAPH, load_workflow, transform_frame

    encoded = transform_frame(load_workflow(config.workflow_dir, ITEM_SUBGRAPH), items)
    return call_signature(ServingSignature(config.candidate_tower_dir), encoded)


def add_to_catalogue(items: pd.DataFrame, vectors: np.ndarray, config: RecipeConfig) -> int:
    """Add the items to the Feast item view, the saved item vectors and the index; the index's new size.

    Feast goes first: an online store that cannot be reached fails the refresh before the vectors
    and the index change. Each file is replaced whole (written aside, then renamed)."""
    from twotower.stages.features import add_rows
    from twotower.store.features import ITEM_VIEW
    from twotower.store.index import add_items, load_index, save_index

    item_ids = items["item_id"].to_numpy()
    catalogue_ids, catalogue_vectors = load_item_vectors(config.item_vectors_path)
    index = load_index(config.index_path)
    add_items(index, item_ids, vectors)
    add_rows(config.feature_repo_dir, ITEM_VIEW, items)
    with atomic_file(config.item_vectors_path) as staging:
        save_item_vectors(
            np.concatenate([catalogue_ids, item_ids]), np.concatenate([catalogue_vectors, vectors]), staging
        )
    save_index(index, config.index_path)
    return index.ntotal


def add_new_items(items: pd.DataFrame, config: RecipeConfig) -> int:
    """Embed ``items`` (none in the catalogue), add them to the catalogue and record the refresh in
    the manifest; the index's new size."""
    consumed = fingerprints(config, REFRESHED)
    catalogue_size = add_to_catalogue(items, embed_items(items, config), config)
    record_refresh(config, consumed, items["item_id"].tolist())
    return catalogue_size


def refreshed_items(config: RecipeConfig, columns: list[str]) -> pd.DataFrame:
    """The items that refresh-items added and that are still served (the refresh in effect), with
    the features they were added with (Feast's item view source) in ``columns``, the run's item
    table's; no rows if there are none."""
    from twotower.store.features import ITEM_VIEW

    entries = read_manifest(config)
    if not refresh_in_effect(entries):
        return pd.DataFrame(columns=columns)
    added = [item for refresh in entries[REFRESH]["added"] for item in refresh["item_ids"]]
    rows = pd.read_parquet(config.feature_repo_dir / "data" / f"{ITEM_VIEW}.parquet")
    return rows[rows["item_id"].isin(added)][columns].reset_index(drop=True)


def roll_out(url: str, model_name: str, version: int, timeout_s: float) -> None:
    """Have the server at ``url`` load the model again, which serves ``version`` (its newest), and
    wait until the versions it served before are unloaded. RolloutFailed if it does not load it:
    the server then keeps serving the previous version."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with grpcclient.InferenceServerClient(url) as client:
        try:
            client.load_model(model_name, client_timeout=timeout_s)
            ready = client.is_model_ready(model_name, str(version), client_timeout=timeout_s)
        except InferenceServerException as error:
            raise RolloutFailed(
                f"{url} did not load version {version} of {model_name} and serves the previous one: {error.message()}"
            ) from None
        if not ready:
            raise RolloutFailed(f"{url} loaded {model_name}, but version {version} is not ready; see the server log")
        deadline = time.monotonic() + timeout_s
        while _other_versions_loaded(client, model_name, version, timeout_s):
            if time.monotonic() > deadline:
                raise RolloutFailed(
                    f"{url} serves version {version}, but older versions of {model_name} were still loaded "
                    f"after {timeout_s:.0f} s"
                )
            time.sleep(0.2)


def _other_versions_loaded(client, model_name: str, version: int, timeout_s: float) -> bool:
    """True while a version other than ``version`` is still ready or unloading (answering requests it holds)."""
    index = client.get_model_repository_index(as_json=True, client_timeout=timeout_s).get("models", [])
    return any(
        m["name"] == model_name and m.get("version") != str(version) and m.get("state") in ("READY", "UNLOADING")
        for m in index
    )


def refresh_items(config: RecipeConfig, items_path: Path) -> RefreshReport:
    """refresh-items (module docstring): RefreshRefused or ArtifactMismatch before anything changes,
    RolloutFailed if a server did not load the new version."""
    from twotower.models import head_shape

    if head_shape(config.model):
        raise RefreshRefused(
            f"model.name={config.model.name} indexes item heads; "
            "refresh-items adds single item vectors (retrain instead)"
        )
    if config.serve.prerank_candidates:
        raise RefreshRefused(
            f"serve.prerank_candidates={config.serve.prerank_candidates}: "
            "the pre-ranker holds vectors of the items it was trained on only, "
            "so it could not score new ones; they reach a cascade once they have interactions (twotower retrain with "
            "train.new_ids=refit), or serve without the stage (serve.prerank_candidates=0)"
        )
    model_dir = config.export_dir / config.serve.model_name
    with served_run_lock(config):
        items = read_new_items(items_path, config)
        if not (model_dir / "config.pbtxt").exists():
            raise RefreshRefused(f"no exported model at {model_dir}: run `twotower export` first")
        check_export(config)  # the run must agree with itself before it is extended
        refuse_catalogued(items, load_item_vectors(config.item_vectors_path)[0])
        catalogue_size = add_new_items(items, config)
        print(
            f"[refresh] {len(items):,} new items embedded "
            "(cold start: the shared out-of-vocabulary id, their own features) "
            f"and added to Feast's item view; the index holds {catalogue_size:,} items"
        )
        version, servers = roll_out_new_version(config, "refresh")
    return RefreshReport(catalogue_size, version, servers)


def roll_out_new_version(config: RecipeConfig, step: str) -> tuple[int, list[str]]:
    """Export the run as the next version of its exported model and have every running server the
    recipe started on that model repository serve it (``roll_out``, no restart); the version and
    the servers now serving it. ``step`` names the command in the lines printed. Used by
    refresh-items and retrain."""
    from twotower.pipeline import run_export_version
    from twotower.serving.triton import recipe_servers

    version = run_export_version(config)
    servers = recipe_servers(config.export_dir)
    for url in servers:
        roll_out(url, config.serve.model_name, version, config.serve.startup_timeout_s)
        print(f"[{step}] {url} serves version {version}; the previous version was unloaded once its requests completed")
    if not servers:
        print(f"[{step}] no running server of {config.export_dir}: the next one started serves version {version}")
    return version, servers


def served_run_lock(config: RecipeConfig):
    """One command at a time that rewrites a served run's artifacts in place (refresh-items, retrain):
    each reads the index, the vectors and the store, and writes them back. In a folder where nothing
    has run, MissingArtifact before anything is written there."""
    require_a_run(read_manifest(config), config)
    return exclusive_lock(config.output_dir / ".refresh.lock")

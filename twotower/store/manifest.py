"""The run manifest: what each stage consumed and produced, so artifacts cannot silently disagree.

Every stage writes its outputs atomically (a staging file or folder beside the target,
renamed into place only once complete) and then records, in ``output_dir/manifest.json``,
a content fingerprint of each input it read and each output it wrote::

    {"train": {"consumed": {"workflow": "<sha256>", ...}, "produced": {"query_tower": ...},
               "finished": "2026-11-28T09:30:00+00:00"}, ...}

``check_export`` compares them: a stage that used another run's inputs, or whose outputs
on disk are no longer what it wrote, must run again, and so must every stage after it.

``retrain`` (twotower/lifecycle/retrain.py) is no entry of its own: it runs the stages again, each recorded
as above (with train.new_ids=oov the workflow stage keeps its fitted vocabularies and says so in
its details, and the train stage records the weights it warm-started from).

``refresh-items`` (twotower/lifecycle/refresh.py) adds items to the outputs of three stages in place: the
item vectors (train), the index and the Feast repository (features). Its entry, ``refresh``,
records the fingerprints it started from and those it left; the export accepts the refreshed
artifacts while every one of those three stages is still the run the refreshes started from.
Once one of them runs again the refresh no longer applies, as a whole: the export names the
stages to re-run (which drops the refreshed items), and refresh-items is run again after them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from twotower.config import ConfigError, RecipeConfig, config_to_dict, prerank_config
from twotower.store.artifacts import MissingArtifact
from twotower.store.atomic import atomic_file, exclusive_lock

CHUNK_BYTES = 1 << 20


# Written into the exported model folder: the fingerprints of what the export packaged.
EXPORT_RECORD = "run_fingerprints.json"


class ArtifactMismatch(RuntimeError):
    """Artifacts from different runs would be served together; the message names the stages to re-run."""


@dataclass(frozen=True)
class StageIO:
    consumes: tuple[str, ...]
    produces: tuple[str, ...]


DATA = ("users", "items", "splits")


# In pipeline order; each artifact name is produced by exactly one stage.
STAGES: dict[str, StageIO] = {
    "data": StageIO((), DATA),
    "workflow": StageIO(DATA, ("workflow", "train_encoded")),
    # model_weights: the whole model's, what `twotower retrain` warm-starts from
    "train": StageIO(
        (*DATA, "workflow", "train_encoded"),
        ("query_tower", "candidate_tower", "item_vectors", "model_weights", "pair_scorer"),
    ),
    # the query tower's vectors measure the index's recall (index.kind=auto chooses by it)
    "index": StageIO(("item_vectors", "query_tower"), ("index",)),
    # the encoded user features come from the saved user workflow
    "features": StageIO((*DATA, "workflow"), ("feature_store",)),
}


PRODUCER = {name: stage for stage, io in STAGES.items() for name in io.produces}


# What the export packages or checks: the query tower, the index and its catalogue, the Feast
# repository, the training split (most-popular fallback) and the workflow the store must match.
EXPORT_CONSUMES = ("splits", "workflow", "query_tower", "item_vectors", "index", "feature_store")


PRERANK_PARTS = ("query_tower", "item_vectors", "pair_scorer")  # of the pre-ranker's run, what the export packages


REFRESH = "refresh"  # the manifest entry of refresh-items, which is not a stage of the pipeline


REFRESHED = ("item_vectors", "index", "feature_store")  # what refresh-items rewrites in place


def artifact_paths(config: RecipeConfig) -> dict[str, Path]:
    return {
        "users": config.data_dir / "users.parquet",
        "items": config.data_dir / "items.parquet",
        "splits": config.splits_dir,
        "workflow": config.workflow_dir,
        "train_encoded": config.train_encoded_dir,
        "query_tower": config.query_tower_dir,
        "candidate_tower": config.candidate_tower_dir,
        "item_vectors": config.item_vectors_path,
        "model_weights": config.model_weights_path,
        "pair_scorer": config.pair_scorer_dir,
        "index": config.index_path,
        "feature_store": config.feature_repo_dir,
    }


def fingerprint(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative path and bytes, sorted by path).

    Only relative paths enter, so a copied or moved run keeps its fingerprints.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no artifact at {path}")
    digest = hashlib.sha256()
    files = (
        [(Path(), path)] if path.is_file() else sorted((p.relative_to(path), p) for p in path.rglob("*") if p.is_file())
    )
    for relative, file in files:
        # name and size delimit each file, so no two different folders hash the same stream
        digest.update(f"{relative.as_posix()}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def _fingerprint_or_none(path: Path) -> str | None:
    try:
        return fingerprint(path)
    except FileNotFoundError:
        return None


def fingerprints(config: RecipeConfig, names: tuple[str, ...]) -> dict[str, str]:
    """The fingerprints of the run's artifacts ``names``; one that does not exist yet is a
    MissingArtifact naming the stage that writes it."""
    paths = artifact_paths(config)
    for name in names:
        if not paths[name].exists():
            raise MissingArtifact(f"no {name} at {paths[name]}: run the '{PRODUCER[name]}' stage first")
    return {name: fingerprint(paths[name]) for name in names}


def read_manifest(config: RecipeConfig) -> dict[str, dict]:
    try:
        return json.loads(config.manifest_path.read_text())
    except FileNotFoundError:
        return {}


def _manifest_lock(config: RecipeConfig):
    """Stages run as separate processes may finish together: one read-modify-write at a time."""
    return exclusive_lock(config.output_dir / ".manifest.lock")


def record_stage(config: RecipeConfig, stage: str, consumed: dict[str, str], details: dict | None = None) -> None:
    """Record that ``stage`` finished: what it consumed, the fingerprints of its outputs now, and
    any ``details`` it measured (the index's chosen kind and recall)."""
    produced = fingerprints(config, STAGES[stage].produces)
    with _manifest_lock(config):
        entries = read_manifest(config)
        entries[stage] = {
            "consumed": consumed,
            "produced": produced,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if details:
            entries[stage]["details"] = details
        with atomic_file(config.manifest_path, durable=True) as staging:
            staging.write_text(json.dumps(entries, indent=2, sort_keys=True))


def refresh_in_effect(entries: dict[str, dict]) -> dict[str, str]:
    """The fingerprints the latest refresh-items left on the artifacts it rewrites, if the stages
    that produced those artifacts are still the runs the refreshes started from; else {}."""
    refresh = entries.get(REFRESH)
    if refresh is None or _stages_run_since(entries, refresh):
        return {}
    return refresh["produced"]


def _stages_run_since(entries: dict[str, dict], refresh: dict) -> list[str]:
    """The stages whose outputs changed since the refreshes started from them."""
    return [
        PRODUCER[name]
        for name, started_from in refresh["base"].items()
        if entries.get(PRODUCER[name], {}).get("produced", {}).get(name) != started_from
    ]


def record_refresh(config: RecipeConfig, consumed: dict[str, str], added_item_ids: list[int]) -> None:
    """Record that refresh-items rewrote ``REFRESHED`` (``consumed``: their fingerprints before) by
    adding ``added_item_ids``. A refresh on top of one still in effect continues its record."""
    produced = fingerprints(config, REFRESHED)
    finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with _manifest_lock(config):
        entries = read_manifest(config)
        previous = entries[REFRESH] if refresh_in_effect(entries) else {"base": consumed, "added": []}
        entries[REFRESH] = {
            "base": previous["base"],
            "produced": produced,
            "added": [*previous["added"], {"item_ids": added_item_ids, "finished": finished}],
            "finished": finished,
        }
        with atomic_file(config.manifest_path, durable=True) as staging:
            staging.write_text(json.dumps(entries, indent=2, sort_keys=True))


@contextmanager
def recorded_stage(config: RecipeConfig, stage: str) -> Iterator[dict]:
    """Fingerprint ``stage``'s inputs before it reads them, record it once it succeeds; the
    yielded dict takes details the stage wants recorded with it."""
    consumed = fingerprints(config, STAGES[stage].consumes)
    details: dict = {}
    yield details
    record_stage(config, stage, consumed, details)


def _stale_reason(
    stage: str,
    entries: dict[str, dict],
    on_disk: dict[str, str | None],
    stale: dict[str, str],
    refreshed: dict[str, str],
) -> str | None:
    """Why ``stage`` must run again (None: it need not); ``refreshed``: what a refresh in effect left."""
    entry = entries.get(stage)
    if entry is None:
        return "it has not run (no entry in the run manifest)"
    io = STAGES[stage]
    for name in io.consumes:
        producer = PRODUCER[name]
        if producer in stale:
            return f"it reads the {name} of '{producer}', which must run again first"
        if entry["consumed"].get(name) != entries[producer]["produced"].get(name):
            return f"it used the {name} of an earlier '{producer}' run"
    for name in io.produces:
        if on_disk[name] is None:
            return f"its {name} is missing"
        if refreshed.get(name, entry["produced"].get(name)) != on_disk[name]:
            refresh = entries.get(REFRESH)
            if refresh is not None and refresh["produced"].get(name) == on_disk[name]:
                since = ", ".join(f"'{s}'" for s in _stages_run_since(entries, refresh))
                return (
                    f"its {name} on disk holds items added by refresh-items, which no longer applies because {since} "
                    f"ran again since (re-running drops those items: run refresh-items again afterwards)"
                )
            return f"its {name} on disk is not what it wrote (changed since, or the stage was interrupted)"
    return None


def require_a_run(entries: dict[str, dict], config: RecipeConfig) -> None:
    """MissingArtifact naming the first stage unless some stage has run under ``config.output_dir``
    (``entries``: its manifest)."""
    if not entries.keys() & STAGES.keys():
        raise MissingArtifact(f"no stage has run under {config.output_dir}: run the '{next(iter(STAGES))}' stage first")


def check_export(config: RecipeConfig) -> dict[str, str]:
    """Refuse (ArtifactMismatch) unless every stage ran on the outputs of the stages before it and
    its outputs are still on disk as it wrote them. Returns the fingerprints the export packages."""
    entries = read_manifest(config)
    require_a_run(entries, config)
    on_disk = {name: _fingerprint_or_none(path) for name, path in artifact_paths(config).items()}
    refreshed = refresh_in_effect(entries)
    stale: dict[str, str] = {}
    for stage in STAGES:  # in order: a stage after a stale one is stale too
        reason = _stale_reason(stage, entries, on_disk, stale, refreshed)
        if reason is not None:
            stale[stage] = reason
    if stale:
        lines = "\n".join(f"  {stage}: {reason}" for stage, reason in stale.items())
        rerun = ", ".join(f"twotower {stage}" for stage in stale)
        raise ArtifactMismatch(
            f"export refused: the artifacts under {config.output_dir} come from different runs.\n{lines}\n"
            f"Re-run, in this order: {rerun}; then twotower export."
        )
    return {name: on_disk[name] for name in EXPORT_CONSUMES}


def check_prerank(config: RecipeConfig) -> dict[str, str]:
    """With ``serve.prerank_candidates`` set: refuse a pre-ranker that is missing, was trained on
    another split or workflow than this run's (its catalogue and codes would differ), with other
    model settings than the configuration names, or whose saved parts changed since. Returns the
    fingerprints of the parts the export packages."""
    serve = config.serve
    if not serve.prerank_candidates:
        return {}
    if serve.prerank_candidates < serve.top_k:
        raise ConfigError(
            f"serve.prerank_candidates={serve.prerank_candidates}: "
            f"at least serve.top_k={serve.top_k} (0 turns the stage off)"
        )
    ranker = prerank_config(config)
    trained = read_manifest(ranker).get("train")
    if trained is None or not ranker.metrics_path.exists():
        raise ArtifactMismatch(
            f"no pre-ranker trained in {ranker.output_dir}: run `twotower prerank` (or set serve.prerank_run)"
        )
    ours = fingerprints(config, ("splits", "workflow"))
    other_inputs = [name for name, value in ours.items() if trained["consumed"].get(name) != value]
    if other_inputs:
        raise ArtifactMismatch(
            f"the pre-ranker in {ranker.output_dir} was trained on another {' and '.join(other_inputs)} "
            "than this run's; run `twotower prerank` again"
        )
    settings = json.loads(ranker.metrics_path.read_text())["config"]["model"]
    if settings != config_to_dict(ranker)["model"]:
        raise ArtifactMismatch(
            f"the pre-ranker in {ranker.output_dir} is a {settings['name']} trained with other model.* settings than "
            f"serve.prerank_model={serve.prerank_model} and this configuration's; run `twotower prerank` again"
        )
    with (
        np.load(config.item_vectors_path) as ours,
        np.load(ranker.item_vectors_path) as theirs,
    ):  # train.save_item_vectors' files
        missing = np.setdiff1d(ours["item_ids"], theirs["item_ids"])
    if len(missing):
        raise ArtifactMismatch(
            f"{len(missing)} items of this run's catalogue (e.g. {missing[0]}) "
            f"are not in the pre-ranker's in {ranker.output_dir} "
            "(added by refresh-items?); run `twotower prerank` again"
        )
    paths = artifact_paths(ranker)
    parts = {name: _fingerprint_or_none(paths[name]) for name in PRERANK_PARTS}
    absent = [name for name, value in parts.items() if value is None]
    if absent:
        raise ArtifactMismatch(
            f"the pre-ranker in {ranker.output_dir} has no {' and no '.join(absent)} "
            "(trained before the recipe saved it); run `twotower prerank` again"
        )
    changed = [name for name, value in parts.items() if trained["produced"].get(name) != value]
    if changed:
        raise ArtifactMismatch(
            f"the pre-ranker's {' and '.join(changed)} in {ranker.output_dir} changed since it was trained; "
            "run `twotower prerank` again"
        )
    return {f"prerank_{name}": value for name, value in parts.items()}

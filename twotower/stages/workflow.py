"""Stage 2: the NVTabular workflow that encodes user and item features.

One workflow with two named subgraphs, ``user`` and ``item``, fitted on the
training split only. The serving graph and the item-embedding step load the
saved subworkflows, so training and serving encode features identically.

Fitting and encoding run in this process by default, or on a Dask cluster
(``workflow.dask_workers`` / ``workflow.dask_scheduler``) for the stage's duration.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import dask.dataframe
import merlin.io
import numpy as np
import nvtabular as nvt
import pandas as pd
from merlin.dag import postorder_iter_nodes
from merlin.dag.ops.subgraph import Subgraph

from twotower.config import SchemaConfig, WorkflowConfig
from twotower.stages.data import users_with_history
from twotower.store.artifacts import MissingArtifact, model_features

USER_SUBGRAPH = "user"
ITEM_SUBGRAPH = "item"
FULL_WORKFLOW = "full"  # both subgraphs: what encodes the training rows


def item_vocabulary(train_rows: pd.DataFrame) -> pd.Series:
    """Training item ids, most frequent first (ties by id): one vocabulary for the
    candidate ``item_id`` and the query-side ``history`` so their codes agree."""
    counts = train_rows["item_id"].value_counts()
    order = sorted(counts.index, key=lambda item: (-counts[item], item))
    return pd.Series(order, name="item_id", dtype="int64")


def build_workflow(category_dir: Path, items: pd.Series, schema: SchemaConfig, with_history: bool) -> nvt.Workflow:
    """Encode the declared features and tag ids and features as USER/ITEM.

    Categorical and multi-valued columns are categorified (values unseen in training go to
    Categorify's out-of-vocabulary code); continuous ones get missing values filled with the
    training median and are normalised. ``category_dir`` keeps Categorify's vocabularies out
    of the working directory; ``items`` is the item vocabulary shared by ``item_id`` and ``history``.
    """

    def categorify(**kwargs) -> nvt.ops.Categorify:
        return nvt.ops.Categorify(out_path=str(category_dir), **kwargs)

    def encoded(side: str, tag_op) -> list:
        categorical = model_features(schema, side, ("categorical", "multi_categorical"))
        continuous = model_features(schema, side, ("continuous",))
        parts = [categorical >> categorify() >> tag_op()] if categorical else []
        if continuous:
            parts.append(continuous >> nvt.ops.FillMedian() >> nvt.ops.Normalize() >> tag_op())
        return parts

    user = [["user_id"] >> categorify() >> nvt.ops.TagAsUserID(), *encoded("user", nvt.ops.TagAsUserFeatures)]
    if with_history:
        user.append(
            ["history"] >> categorify(vocabs={"history": items.rename("history")}) >> nvt.ops.TagAsUserFeatures()
        )
    item = [
        ["item_id"] >> categorify(vocabs={"item_id": items}) >> nvt.ops.TagAsItemID(),
        *encoded("item", nvt.ops.TagAsItemFeatures),
    ]
    return nvt.Workflow(
        Subgraph(USER_SUBGRAPH, sum(user[1:], user[0])) + Subgraph(ITEM_SUBGRAPH, sum(item[1:], item[0]))
    )


def _local_cluster(workers: int):
    """``workers`` worker processes on loopback: one per GPU where cudf runs, else CPU processes."""
    from merlin.core.compat import HAS_GPU, cudf

    if HAS_GPU and cudf is not None:
        from dask_cuda import LocalCUDACluster

        return LocalCUDACluster(n_workers=workers, host="127.0.0.1", dashboard_address=None)
    from distributed import LocalCluster

    # One thread per process: pandas work holds the GIL, so processes are what run in parallel.
    return LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    )


@contextmanager
def dask_execution(settings: WorkflowConfig) -> Iterator[int]:
    """Run NVTabular in this process, on a local cluster or on a running one, inside the block.

    Yields how many partitions to split data into: one per Dask worker, 1 in process.
    A local cluster is shut down on exit; a remote one is only disconnected from.
    """
    if settings.dask_workers < 0:
        raise ValueError(f"workflow.dask_workers must be >= 0, got {settings.dask_workers}")
    if not settings.dask_workers and not settings.dask_scheduler:
        yield 1
        return
    from distributed import Client
    from merlin.core.utils import Distributed

    with ExitStack() as stack:
        if settings.dask_scheduler:
            client = stack.enter_context(Client(settings.dask_scheduler))
        else:
            client = stack.enter_context(Client(stack.enter_context(_local_cluster(settings.dask_workers))))
        # Merlin's own switch: NVTabular's executor and merlin.io use this client until the block ends.
        stack.enter_context(Distributed(client=client))
        yield max(1, len(client.scheduler_info()["workers"]))


def _zero_based(part: pd.DataFrame) -> pd.DataFrame:
    return part.reset_index(drop=True)


def _dataset(rows: pd.DataFrame, partitions: int = 1) -> merlin.io.Dataset:
    # NVTabular's list-column encoding misaligns (nulls) unless each partition's index
    # starts at 0: a filtered frame keeps its old index, a later partition continues it.
    frame = dask.dataframe.from_pandas(rows.reset_index(drop=True), npartitions=partitions)
    return merlin.io.Dataset(frame.map_partitions(_zero_based))


def fit_workflow(
    train_rows: pd.DataFrame, schema: SchemaConfig, category_dir: Path, partitions: int = 1
) -> nvt.Workflow:
    workflow = build_workflow(category_dir, item_vocabulary(train_rows), schema, "history" in train_rows.columns)
    workflow.fit(_dataset(train_rows, partitions))
    return workflow


def transform_to_parquet(
    workflow: nvt.Workflow, rows: pd.DataFrame, out_dir: Path, partitions: int = 1
) -> merlin.io.Dataset:
    """Encode ``rows`` and write them as parquet together with the Merlin schema."""
    workflow.transform(_dataset(rows, partitions)).to_parquet(str(out_dir), output_files=1)
    return merlin.io.Dataset(str(out_dir), engine="parquet")


def transform_frame(workflow: nvt.Workflow, rows: pd.DataFrame) -> pd.DataFrame:
    return workflow.transform(_dataset(rows)).to_ddf().compute().reset_index(drop=True)


def save_workflows(workflow: nvt.Workflow, workflow_dir: Path) -> None:
    """Save the full workflow and its user/item subworkflows (each self-contained)."""
    workflow.save(str(workflow_dir / FULL_WORKFLOW))
    for name in (USER_SUBGRAPH, ITEM_SUBGRAPH):
        workflow.get_subworkflow(name).save(str(workflow_dir / name))


def load_workflow(workflow_dir: Path, name: str) -> nvt.Workflow:
    path = workflow_dir / name
    if not (path / "workflow.pkl").exists():
        raise MissingArtifact(f"no saved workflow at {path}; run the 'workflow' stage first")
    return nvt.Workflow.load(str(path))


def category_table(workflow: nvt.Workflow, column: str) -> pd.DataFrame:
    """Categorify's vocabulary for ``column``: row index is the encoded value."""
    for node in postorder_iter_nodes(workflow.output_node, flatten_subgraphs=True):
        if isinstance(node.op, nvt.ops.Categorify) and column in node.op.categories:
            return pd.read_parquet(node.op.categories[column])
    raise KeyError(f"no Categorify vocabulary for column {column!r}")


# ------------------------------------------- encoding with the saved workflows
@dataclass
class SavedWorkflows:
    """The fitted user and item subworkflows, loaded once per stage."""

    user: nvt.Workflow
    item: nvt.Workflow


def load_saved_workflows(workflow_dir: Path) -> SavedWorkflows:
    return SavedWorkflows(load_workflow(workflow_dir, USER_SUBGRAPH), load_workflow(workflow_dir, ITEM_SUBGRAPH))


@dataclass
class Catalogue:
    """The retrievable items: those in the fitted item vocabulary, in one fixed order."""

    item_ids: np.ndarray  # dataset ids
    features: pd.DataFrame  # encoded item features, rows aligned with item_ids


def encoded_catalogue(workflows: SavedWorkflows, items: pd.DataFrame) -> Catalogue:
    """The retrievable items (the fitted item vocabulary, sorted by dataset id) with their
    features encoded by the saved item workflow (no refit)."""
    item_ids = np.sort(category_table(workflows.item, "item_id")["item_id"].to_numpy())
    catalogue_items = items[items["item_id"].isin(item_ids)].sort_values("item_id")
    return Catalogue(item_ids=item_ids, features=transform_frame(workflows.item, catalogue_items))


def encode_users(workflows: SavedWorkflows, users: pd.DataFrame) -> pd.DataFrame:
    """``users`` encoded by the saved user workflow, indexed by dataset user id."""
    return transform_frame(workflows.user, users).set_index(users["user_id"].to_numpy())


def encoded_users(
    workflows: SavedWorkflows, users: pd.DataFrame, history_rows: pd.DataFrame, history_length: int
) -> pd.DataFrame:
    """Every user's encoded features, history (latest ``history_length``) taken from ``history_rows``."""
    return encode_users(workflows, users_with_history(users, history_rows, history_length))

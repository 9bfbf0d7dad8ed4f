"""Exporting the serving graph into a Triton model repository, and reading an export back.

A model is exported whole into a staging folder and swapped in (``export_ensemble``); later
versions are added beside the served one (``export_version``). merlin-systems writes
``executor_model/config.pbtxt`` with one instance of kind AUTO and no batching;
``apply_serving_settings`` gives it the recipe's serving contract (a batch dimension of up to
``serve.max_request_users`` users), ``serve.instance_count`` and, when ``serve.dynamic_batching``
is on, Triton's dynamic batcher, editing the configuration as the protobuf message Triton itself
reads; every export gets the recipe's executor ``model.py`` (``executor_model.py``: requests
batched together answered by one pass of the graph, its error statuses).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from merlin.dag import postorder_iter_nodes
from merlin.systems.dag import Ensemble
from merlin.table import TensorTable
from tritonclient.grpc import model_config_pb2

from twotower.config import ServeConfig
from twotower.serving.triton import EXECUTOR_MODEL_SOURCE, check_exported_code
from twotower.store.atomic import atomic_dir, staging_dir

MODEL_NAME = "executor_model"


def export_ensemble(
    ensemble: Ensemble, export_dir: Path, serve: ServeConfig, finish: Callable[[Path], None] | None = None
) -> Path:
    """Write the model ``serve.model_name`` with the serving settings of ``serve`` into the Triton model
    repository ``export_dir``, replacing an older export of it whole: it is built in a staging folder,
    completed there by ``finish(model_dir)``, then swapped in, so a failed or killed export leaves the
    previous model in place.

    The staging folder sits inside ``export_dir``, at the model's own depth: operators record
    paths relative to it (the Feast repository), and ``export_dir`` may be a volume of its own,
    so a folder outside it could not be renamed in. One left by a killed export is removed by
    the next; the recipe's servers load only ``model_name`` (explicit model control) meanwhile.
    Every export gets the recipe's executor ``model.py`` (its error statuses).
    """

    with atomic_dir(export_dir / serve.model_name) as model_dir:
        ensemble.export(str(export_dir), name=model_dir.name)
        _name_model(model_dir, serve.model_name)
        install_executor_model(model_dir)
        apply_serving_settings(model_dir, serve)
        if finish is not None:
            finish(model_dir)
    return export_dir


def model_versions(model_dir: Path) -> list[int]:
    """The version folders of an exported model, oldest first (Triton's: whole numbers)."""
    return sorted(int(path.name) for path in Path(model_dir).iterdir() if path.is_dir() and path.name.isdigit())


def export_version(ensemble: Ensemble, export_dir: Path, model_name: str = MODEL_NAME) -> int:
    """Write the graph as the next version of the already exported ``model_name``, beside the version
    a server may be serving, and return its number; the model's ``config.pbtxt`` stays as it is.

    The version is exported whole into a staging model folder at the model's own depth (operators
    record paths relative to it), then renamed into place in one step, so Triton never sees half
    a version. Versions older than the newest existing one are removed first: the recipe's servers
    serve only the newest (version policy ``latest: 1``), and each copy holds a tower and an index.
    """

    model_dir = export_dir / model_name
    existing = model_versions(model_dir)
    if not existing:
        raise FileNotFoundError(f"no exported model {model_name!r} in {export_dir}; run the 'export' stage")
    for old in existing[:-1]:
        shutil.rmtree(model_dir / str(old))
    version = existing[-1] + 1
    with staging_dir(model_dir) as staging:
        ensemble.export(str(export_dir), name=staging.name)
        install_executor_model(staging)
        (exported_version,) = model_versions(staging)
        os.rename(staging / str(exported_version), model_dir / str(version))
    return version


def read_model_config(model_dir: Path) -> model_config_pb2.ModelConfig:
    """An exported model's ``config.pbtxt``."""
    return text_format.Parse((Path(model_dir) / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def _write_model_config(model_dir: Path, config: model_config_pb2.ModelConfig) -> None:
    (Path(model_dir) / "config.pbtxt").write_text(text_format.MessageToString(config))


def _name_model(model_dir: Path, name: str) -> None:
    """Set the model name in ``config.pbtxt`` (merlin-systems writes the folder's, the staging name)."""
    config = read_model_config(model_dir)
    config.name = name
    _write_model_config(model_dir, config)


def load_exported_ensemble(export_dir: Path, model_name: str = MODEL_NAME) -> Ensemble:
    """The exported graph loaded as the Triton executor loads it (its newest version), to run in process;
    an export written by another version of the package is refused (``check_exported_code``)."""
    check_exported_code(export_dir / model_name)
    artifact_dir = export_dir / model_name / str(model_versions(export_dir / model_name)[-1]) / "ensemble"
    ensemble = Ensemble.load(str(artifact_dir))
    for node in postorder_iter_nodes(ensemble.graph.output_node, flatten_subgraphs=True):
        node.op.load_artifacts(str(artifact_dir))
    return ensemble


def recommend_in_process(ensemble: Ensemble, user_ids: np.ndarray) -> dict[str, np.ndarray]:
    from merlin.systems.dag.runtimes.triton import TritonExecutorRuntime

    ids = np.asarray(user_ids)
    ids = ids.astype(np.int64) if ids.dtype.kind in "iu" else ids.astype(object)  # text ids as Triton hands them in
    output = ensemble.transform(TensorTable({"user_id": ids}), runtime=TritonExecutorRuntime())
    return {name: np.asarray(output[name].values) for name in ("item_ids", "scores", "is_fallback")}


def _add_batch_dimension(config: model_config_pb2.ModelConfig, max_users: int) -> None:
    """Requests carry up to ``max_users`` users on a batch dimension Triton knows, so its dynamic
    batcher can hand several requests to the executor together.

    With ``max_batch_size > 0`` Triton adds the batch dimension itself, so every tensor's dims
    lose their leading -1 and one with nothing left gets dims [1]: clients send ``user_id`` as
    [n, 1] and receive ``is_fallback`` as [n, 1]. No ``reshape`` to []: Triton 2.51's python
    backend crashes the server on an empty batch of such an input, while with dims [1] Triton
    itself refuses it as INVALID_ARGUMENT.
    """
    if max_users < 1:
        raise ValueError(f"serve.max_request_users must be >= 1, got {max_users}")
    if not config.max_batch_size:  # as merlin-systems wrote it, every tensor's dims lead with -1
        for tensor in (*config.input, *config.output):
            per_row = list(tensor.dims)[1:] or [1]
            del tensor.dims[:]
            tensor.dims.extend(per_row)
    config.max_batch_size = max_users


def apply_serving_settings(model_dir: Path, serve: ServeConfig) -> model_config_pb2.ModelConfig:
    """Rewrite ``model_dir/config.pbtxt`` (as merlin-systems wrote it, or as this function did) with
    the batch dimension, instance count and dynamic batcher of ``serve``."""
    if serve.instance_count < 1:
        raise ValueError(f"serve.instance_count must be >= 1, got {serve.instance_count}")
    config = read_model_config(model_dir)
    del config.instance_group[:]
    # KIND_CPU: `count` is then the total number of instances. The executor is a python
    # model; TensorFlow inside it still finds a GPU where there is one.
    config.instance_group.add(count=serve.instance_count, kind=model_config_pb2.ModelInstanceGroup.KIND_CPU)
    _add_batch_dimension(config, serve.max_request_users)
    config.ClearField("dynamic_batching")
    if serve.dynamic_batching:
        config.dynamic_batching.max_queue_delay_microseconds = serve.max_queue_delay_us
    _write_model_config(model_dir, config)
    return config


def served_settings(model_dir: Path) -> dict[str, int | bool]:
    """The serving settings an exported ``model_dir/config.pbtxt`` holds (what Triton will run,
    whatever the configuration says now)."""
    config = read_model_config(model_dir)
    return {
        "dynamic_batching": config.HasField("dynamic_batching"),
        "max_queue_delay_us": config.dynamic_batching.max_queue_delay_microseconds,
        "instance_count": sum(group.count for group in config.instance_group),
    }


def install_executor_model(model_dir: Path) -> None:
    """Replace Merlin's executor ``model.py`` with the recipe's, which maps the graph's errors
    to gRPC statuses (INVALID_ARGUMENT for a client's mistake) without tracebacks."""
    for version_dir in Path(model_dir).iterdir():
        if (version_dir / "model.py").exists():
            shutil.copy2(EXECUTOR_MODEL_SOURCE, version_dir / "model.py")

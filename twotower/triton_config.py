"""Serving settings written into the exported model's Triton configuration.

merlin-systems writes ``executor_model/config.pbtxt`` with one instance of kind
AUTO and no batching. After the export this step sets ``serve.instance_count``
and, when ``serve.dynamic_batching`` is on, Triton's dynamic batcher, editing the
configuration as the protobuf message Triton itself reads, and installs the recipe's
executor ``model.py`` (``twotower/triton_executor_model.py``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from twotower.config import ServeConfig

EXECUTOR_MODEL_SOURCE = Path(__file__).with_name("triton_executor_model.py")


def _enable_dynamic_batching(config: model_config_pb2.ModelConfig, serve: ServeConfig) -> None:
    """Triton queues requests up to ``max_queue_delay_us`` and hands them to the model together.

    With ``max_batch_size > 0`` Triton adds the batch dimension itself, so every
    tensor's dims lose their leading -1. ``user_id`` [-1] has nothing left, and an
    input needs a dimension: it becomes dims [1] reshaped to [], so clients send
    shape [n, 1] while the executor still receives [n]. Outputs [-1, k] become [k].
    """
    if serve.max_batch_size < 1:
        raise ValueError(f"serve.max_batch_size must be >= 1 with dynamic batching, got {serve.max_batch_size}")
    config.max_batch_size = serve.max_batch_size
    config.dynamic_batching.max_queue_delay_microseconds = serve.max_queue_delay_us
    for tensor in (*config.input, *config.output):
        per_row = list(tensor.dims)[1:]
        del tensor.dims[:]
        if per_row:
            tensor.dims.extend(per_row)
        else:
            tensor.dims.append(1)
            tensor.reshape.SetInParent()  # an empty reshape: the model sees no per-row dimension


def apply_serving_settings(model_dir: Path, serve: ServeConfig) -> model_config_pb2.ModelConfig:
    """Rewrite ``model_dir/config.pbtxt`` with the instance count and batching of ``serve``."""
    if serve.instance_count < 1:
        raise ValueError(f"serve.instance_count must be >= 1, got {serve.instance_count}")
    path = Path(model_dir) / "config.pbtxt"
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    del config.instance_group[:]
    # KIND_CPU: `count` is then the total number of instances. The executor is a python
    # model; TensorFlow inside it still finds a GPU where there is one.
    config.instance_group.add(count=serve.instance_count, kind=model_config_pb2.ModelInstanceGroup.KIND_CPU)
    if serve.dynamic_batching:
        _enable_dynamic_batching(config, serve)
    path.write_text(text_format.MessageToString(config))
    return config


def install_executor_model(model_dir: Path) -> None:
    """Replace Merlin's executor ``model.py`` with the recipe's, which maps the graph's errors
    to gRPC statuses (INVALID_ARGUMENT for a client's mistake) without tracebacks."""
    for version_dir in Path(model_dir).iterdir():
        if (version_dir / "model.py").exists():
            shutil.copy2(EXECUTOR_MODEL_SOURCE, version_dir / "model.py")

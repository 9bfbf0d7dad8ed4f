"""Shared fixtures: one small synthetic run of the whole pipeline per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from twotower import pipeline
from twotower.config import RecipeConfig, load_config

SMALL_RUN = [
    "data.dataset=synthetic",
    "train.epochs=4",
    "train.batch_size=256",
    "train.early_stopping_patience=4",
    "serve.top_k=5",
    "serve.instance_count=1",  # one TensorFlow runtime per test server: tests measure no throughput
]


def small_config(root: Path, *extra: str) -> RecipeConfig:
    config = load_config(overrides=[*SMALL_RUN, *extra])
    config.output_dir = root / "artifacts"
    config.export_dir = root / "triton_models"
    return config


def served_user_columns(config: RecipeConfig) -> list[str]:
    """The Feast user view's profile columns: the files' id and every declared user feature."""
    from twotower.store.artifacts import EXTERNAL_ID

    return [EXTERNAL_ID, *config.data.schema.user_features]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing (or timed-out) test shows the log of every Triton server still running."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        from twotower.serving.triton import running_servers

        for server in running_servers():
            report.sections.append((f"tritonserver pid {server.process.pid} log (last lines)", server.log_tail(80)))


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> RecipeConfig:
    """Data and fitted workflow only."""
    config = small_config(tmp_path_factory.mktemp("prepared"))
    pipeline.run_data(config)
    pipeline.run_workflow(config)
    return config


@pytest.fixture(scope="session")
def inputs(prepared):
    """The prepared run's training inputs: encoded positives, catalogue, statistics."""
    from twotower.stages.train import load_training_inputs

    return load_training_inputs(prepared)


def registry_model(prepared: RecipeConfig, inputs, name: str, **settings):
    """Model ``name`` of the registry built on the prepared run with ``settings`` (dotted keys)
    set: its configuration and the model."""
    import copy

    from twotower.config import set_value
    from twotower.models import builder

    config = copy.deepcopy(prepared)
    set_value(config, "model.name", name)
    for key, value in settings.items():
        set_value(config, key, value)
    return config, builder(name)(inputs.schema, inputs.stats, config.train, config.model)


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> RecipeConfig:
    """Every stage up to the Triton export, on synthetic data."""
    config = small_config(tmp_path_factory.mktemp("exported"))
    pipeline.run_all(config)
    return config


def _require_redis() -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        message = "redis-server is not installed (Debian package redis-server; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def redis_port(tmp_path_factory):
    """A real redis-server on a free loopback port, without persistence, for the session."""
    from twotower.benchmarks.support.redis_server import RedisServer

    _require_redis()
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.port


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A real three-node Redis Cluster on loopback for the session: its connection string."""
    from twotower.benchmarks.support.redis_server import RedisClusterServers

    _require_redis()
    with RedisClusterServers(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster.connection

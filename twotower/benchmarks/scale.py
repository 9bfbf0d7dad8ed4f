"""``make benchmark-scale``: what the index, the served endpoint and the feature store cost as
the catalogue and the user base grow far past ML-1M.

Catalogues of ``benchmark.scale.sizes`` items are grown from the run's real ML-1M item vectors:
the real items keep their ids and vectors, and each new item is a real one perturbed by noise
on the scale of the real catalogue's nearest-neighbour distances, so the neighbourhoods an index
must find look like the trained model's. Queries are the served query vectors of real test users.
For each size and index kind: build time, measured memory, Recall@10/100 against exact search,
single-user latency in process and through a real Triton server at concurrency 1 and 16 (the
recipe's whole graph: Feast lookup, query tower, index search with seen items excluded), and the
kind ``index.kind=auto`` picks. Then Feast: materialization time and online read p50 for
``benchmark.scale.feast_users`` users on SQLite and on an owned Redis. Prints tables, saves a
plot, and writes JSON whose path is the last line printed.
"""

from __future__ import annotations

import ctypes
import gc
import os
import shutil
import time
from datetime import date
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from twotower.benchmarks.harness import Column, on_free_ports, output_folder, text_table, write_report
from twotower.config import FeaturesConfig, RecipeConfig
from twotower.stages.index import IndexReport, RecallQueries, build_measured, choose_kind, trainable_kinds
from twotower.store.artifacts import load_item_vectors, load_split
from twotower.store.index import save_index
from twotower.store.manifest import ArtifactMismatch, check_export, fingerprint


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _MallInfo2


def heap_bytes() -> int:
    """Bytes this process holds from malloc now, small blocks and mmapped ones (glibc's own count):
    measured, not predicted from a formula, and unlike resident memory it is not blurred by pages
    freed earlier and reused."""
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


def settled_heap_bytes() -> int:
    """``heap_bytes`` once the garbage collector finds nothing more to free: objects freed in one pass
    (a served graph, whose tower's finalizer then releases its TensorFlow session) can leave others
    collectable only in the next, which would otherwise be freed while an index is being measured."""
    while gc.collect():
        pass
    return heap_bytes()


# -------------------------------------------------------------- the catalogues
def neighbour_spread(vectors: np.ndarray, sample: int = 2000, seed: int = 0) -> float:
    """Per-dimension noise scale: the median distance from a real item to its nearest other item,
    spread over the dimensions."""
    rows = np.random.default_rng(seed).permutation(len(vectors))[:sample]
    distances = np.linalg.norm(vectors[rows, None, :] - vectors[None, :, :], axis=2)
    distances[np.arange(len(rows)), rows] = np.inf
    return float(np.median(distances.min(axis=1)) / np.sqrt(vectors.shape[1]))


def grown_catalogue(
    item_ids: np.ndarray, vectors: np.ndarray, n_items: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``n_items`` items: the real ones first, then perturbed copies of random real ones, each
    rescaled to its original's norm (the model's vectors are L2-normalised)."""
    if n_items < len(item_ids):
        raise ValueError(f"a grown catalogue holds the {len(item_ids):,} real items; asked for {n_items:,}")
    rng = np.random.default_rng(seed)
    spread = neighbour_spread(vectors, seed=seed)
    grown = np.empty((n_items, vectors.shape[1]), dtype=np.float32)
    grown[: len(vectors)] = vectors
    for start in range(len(vectors), n_items, 1_000_000):  # in chunks: 10^7 items never need a second copy
        stop = min(start + 1_000_000, n_items)
        originals = vectors[rng.integers(0, len(vectors), stop - start)]
        copies = originals + rng.normal(scale=spread, size=originals.shape).astype(np.float32)
        copies *= np.linalg.norm(originals, axis=1, keepdims=True) / np.linalg.norm(copies, axis=1, keepdims=True)
        grown[start:stop] = copies
    new_ids = np.arange(n_items - len(item_ids), dtype=np.int64) + int(item_ids.max()) + 1
    return np.concatenate([np.asarray(item_ids, dtype=np.int64), new_ids]), grown


# ------------------------------------------------------------------ serving
def export_with_index(config: RecipeConfig, index_path: Path, export_dir: Path) -> Path:
    """The run's serving graph over another index, exported as ``twotower export`` does."""
    from twotower.serving.export import export_ensemble
    from twotower.serving.graph import build_ensemble, popular_items

    ensemble = build_ensemble(
        config.feature_repo_dir,
        config.events_dir,
        config.query_tower_dir,
        index_path,
        config.serve.top_k,
        popular_items(config),
        exclude_seen=config.serve.exclude_seen,
        max_users=config.serve.max_request_users,
        workflow_fingerprint=fingerprint(config.workflow_dir),
    )
    return export_ensemble(ensemble, export_dir, config.serve)


def served_latency(config: RecipeConfig, export_dir: Path, users: np.ndarray, work_dir: Path) -> dict[str, float]:
    """Single-user p50/p99 in process (the exported graph) and through Triton at concurrency 1 and 16."""
    from twotower.benchmarks.serving import drive_requests, in_process_latency, latency_summary, user_batches, warm_up
    from twotower.serving.triton import TritonServer

    bench = config.benchmark
    in_process = in_process_latency(export_dir, users, bench.scale.requests)
    result = {"p50_ms_in_process": in_process["p50_ms"], "p99_ms_in_process": in_process["p99_ms"]}
    serve = on_free_ports(config.serve)
    timeout = config.serve.client_timeout_s
    with TritonServer(export_dir, work_dir, serve) as server:
        warm_up(server.grpc_url, config, users)
        for concurrency in (1, 16):
            batches = user_batches(users, bench.scale.requests, 1, config.seed + concurrency)
            summary = latency_summary(
                *drive_requests(server.grpc_url, serve.model_name, batches, concurrency, timeout), 1
            )
            if summary["errors"]:
                raise RuntimeError(f"{summary['errors']} requests failed at concurrency {concurrency} on {export_dir}")
            suffix = "" if concurrency == 1 else f"_c{concurrency}"
            result.update(
                {
                    f"p50_ms_triton{suffix}": summary["p50_ms"],
                    f"p99_ms_triton{suffix}": summary["p99_ms"],
                    f"qps_triton{suffix}": summary["qps"],
                }
            )
    return result


def measure_kind(
    config: RecipeConfig,
    kind: str,
    item_ids: np.ndarray,
    vectors: np.ndarray,
    queries: RecallQueries,
    users: np.ndarray,
    work_dir: Path,
) -> tuple[dict, IndexReport]:
    """The benchmark's row for one kind, and the build's own report (what ``auto`` chooses by)."""
    before = settled_heap_bytes()
    index, report = build_measured(kind, item_ids, vectors, config.index, queries, config.serve.top_k, config.seed)
    memory = settled_heap_bytes() - before
    index_path = work_dir / "items.faiss"
    save_index(index, index_path)
    row = {
        "recall@10": report.recall_at_10,
        "recall@100": report.recall_at_100,
        "meets_target": report.meets_target,
        "factory": report.factory,
        "search_knob": report.search_knob,
        "build_s": report.build_s,
        "memory_bytes": memory,
        "bytes_per_item": memory / len(item_ids),
        "file_bytes": index_path.stat().st_size,
        "p50_ms_index_search": report.p50_ms,
    }
    del index
    gc.collect()
    row.update(
        served_latency(config, export_with_index(config, index_path, work_dir / "models"), users, work_dir / "triton")
    )
    shutil.rmtree(work_dir)  # a million-item export is hundreds of MB; the next kind needs the room
    return row, report


def index_scaling(config: RecipeConfig, out_dir: Path) -> tuple[dict, dict]:
    from twotower.stages.evaluate import saved_query_vectors

    real_ids, real_vectors = load_item_vectors(config.item_vectors_path)
    users = load_split(config.splits_dir).test["user_id"].drop_duplicates().to_numpy()
    query_vectors = saved_query_vectors(config, users[: config.index.recall_queries])
    sizes, auto = {}, {}
    for n_items in config.benchmark.scale.sizes:
        item_ids, vectors = grown_catalogue(real_ids, real_vectors, n_items, config.seed)
        queries = RecallQueries.from_vectors(item_ids, vectors, query_vectors, config.seed)
        sizes[str(n_items)], reports = {}, []
        kinds, skipped = trainable_kinds(n_items, vectors.shape[1], config.index)
        for kind, reason in skipped.items():
            print(f"[scale] {n_items:>10,} items  {kind:<9} skipped: {reason}")
        for kind in kinds:
            print(f"[scale] {n_items:>10,} items  {kind:<9} building, measuring, serving ...", flush=True)
            row, report = measure_kind(config, kind, item_ids, vectors, queries, users, out_dir / "work")
            sizes[str(n_items)][kind] = row
            reports.append(report)
            print(
                f"        R@100 {row['recall@100']:.4f}  {row['bytes_per_item']:.0f} B/item  "
                f"build {row['build_s']:.1f} s  "
                f"in process p50 {row['p50_ms_in_process']:.2f} ms  "
                f"Triton p50 {row['p50_ms_triton']:.2f} / p99 {row['p99_ms_triton']:.2f} ms  "
                f"c16 p50 {row['p50_ms_triton_c16']:.2f} ms",
                flush=True,
            )
        auto[str(n_items)] = choose_kind(
            reports, config.index.latency_tolerance_ms
        ).kind  # auto's rule on auto's inputs
        del item_ids, vectors, queries
        gc.collect()
    return sizes, auto


# ------------------------------------------------------------------- Feast
def replicated_users(tables, n_users: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``n_users`` users: the real ones' raw and encoded rows repeated under new ids."""
    rows = np.arange(n_users) % len(tables.users)
    users = tables.users.iloc[rows].reset_index(drop=True)
    users["user_id"] = np.arange(n_users, dtype=np.int64) + 1
    return users, tables.encoded_users.iloc[rows].reset_index(drop=True)


def feast_scaling(config: RecipeConfig, out_dir: Path) -> dict:
    from redis import Redis

    from twotower.benchmarks.support.redis_server import RedisServer
    from twotower.stages.features import build_feature_store, feature_tables
    from twotower.store.features import QUERY_VIEW, USER_VIEW, OnlineReader

    tables = feature_tables(config)
    results: dict[str, dict] = {}
    rng = np.random.default_rng(config.seed)
    with RedisServer(out_dir / "redis") as redis_server:
        stores = {
            "sqlite": FeaturesConfig(online_store="sqlite"),
            "redis": FeaturesConfig(online_store="redis", redis_connection=redis_server.connection),
        }
        for store_name, features in stores.items():
            results[store_name] = {}
            for n_users in config.benchmark.scale.feast_users:
                users, encoded = replicated_users(tables, n_users)
                repo = out_dir / f"feast-{store_name}-{n_users}"
                print(f"[scale] Feast {store_name}: materializing {n_users:,} users ...", flush=True)
                started = time.perf_counter()
                store = build_feature_store(tables._replace(users=users, encoded_users=encoded), repo, features)
                materialize_s = time.perf_counter() - started
                # The served lookup: both views, one user per request, through one store connection.
                query, user = OnlineReader(store, QUERY_VIEW), OnlineReader(store, USER_VIEW, features=("seen_items",))
                latencies = []
                for user_id in rng.integers(1, n_users + 1, config.benchmark.scale.requests + 20):
                    started = time.perf_counter()
                    query.read(np.array([user_id])), user.read(np.array([user_id]))
                    latencies.append((time.perf_counter() - started) * 1000)
                p50, p99 = np.percentile(latencies[20:], [50, 99])
                results[store_name][str(n_users)] = {
                    "materialize_s": materialize_s,
                    "read_p50_ms": float(p50),
                    "read_p99_ms": float(p99),
                }
                print(
                    f"        materialized in {materialize_s:.1f} s; "
                    f"online read (both views) p50 {p50:.3f} ms, p99 {p99:.3f} ms",
                    flush=True,
                )
                shutil.rmtree(repo)
                if store_name == "redis":  # the next size starts from an empty store
                    Redis(host="127.0.0.1", port=redis_server.port).flushall()
    return results


# --------------------------------------------------------------------- report
INDEX_COLUMNS = {  # report key -> column
    "items": Column("items", 10, ","),
    "kind": Column("kind", 10),
    "recall@10": Column("R@10", 8),
    "recall@100": Column("R@100", 8),
    "bytes_per_item": Column("B/item", 8, ".0f"),
    "build_s": Column("build s", 9, ".1f"),
    "p50_ms_in_process": Column("proc p50", 10, ".2f"),
    "p99_ms_in_process": Column("proc p99", 10, ".2f"),
    "p50_ms_triton": Column("Triton p50", 11, ".2f"),
    "p99_ms_triton": Column("p99", 8, ".2f"),
    "p50_ms_triton_c16": Column("c16 p50", 9, ".2f"),
    "p99_ms_triton_c16": Column("c16 p99", 9, ".2f"),
    "auto": Column("", 9),
}
FEAST_COLUMNS = {
    "store": Column("store", 8),
    "users": Column("users", 10, ","),
    "materialize_s": Column("materialize s", 15, ".1f"),
    "read_p50_ms": Column("read p50 ms", 13, ".3f"),
    "read_p99_ms": Column("read p99 ms", 13, ".3f"),
}


def _print_tables(report: dict) -> None:
    index_rows = [
        {**r, "items": int(n_items), "kind": kind, "auto": "<- auto" if report["auto"][n_items] == kind else ""}
        for n_items, kinds in report["sizes"].items()
        for kind, r in kinds.items()
    ]
    feast_rows = [
        {**r, "store": store, "users": int(n_users)}
        for store, by_users in report["feast"].items()
        for n_users, r in by_users.items()
    ]
    for columns, rows in ((INDEX_COLUMNS, index_rows), (FEAST_COLUMNS, feast_rows)):
        print("\n" + text_table(list(columns.values()), [[row[key] for key in columns] for row in rows]))


def run_scale_benchmark(config: RecipeConfig) -> Path:
    from twotower.benchmarks.support.redis_server import require_redis_server
    from twotower.pipeline import run_all
    from twotower.views.plots import plot_scale

    require_redis_server()  # Feast on Redis is measured last: refuse before the index kinds' 20 minutes
    try:
        check_export(config)
    except ArtifactMismatch as reason:  # no finished run yet (a fresh clone): make one first
        print(
            f"[scale] no finished run under {config.output_dir} ({str(reason).splitlines()[0]}); "
            "running the pipeline first"
        )
        run_all(config)
    out_dir = config.output_dir / "benchmark-scale"
    shutil.rmtree(out_dir, ignore_errors=True)  # the grown catalogues of an earlier run are gigabytes
    out_dir = output_folder(config, "scale")
    started = time.perf_counter()
    sizes, auto = index_scaling(config, out_dir)
    feast = feast_scaling(config, out_dir)
    report = {
        "date": date.today().isoformat(),
        "machine": {"cores": os.cpu_count(), "faiss": faiss.__version__},
        "top_k": config.serve.top_k,
        "min_recall": config.index.min_recall,
        "sizes": sizes,
        "auto": auto,
        "feast": feast,
        "wall_seconds": time.perf_counter() - started,
    }
    _print_tables(report)
    plot_scale(report, out_dir / "scale.png")
    json_path = write_report(report, out_dir / "scale.json")
    print(json_path)
    return json_path

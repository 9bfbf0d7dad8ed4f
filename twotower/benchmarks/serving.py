"""``make benchmark-serving``: the recipe's graph against the reference graph, through Triton.

Both graphs serve the same trained model from real Triton servers on loopback (one
at a time, so they never compete for the cores). A bounded load generator drives
each over gRPC: single-user requests at concurrency 1, 4 and 16, then batches of
users at concurrency 1. The in-process DAG (no Triton) is timed on the same users,
and a soak phase mixes good and malformed requests. Prints a table and writes a
JSON file whose path is the last line printed.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from twotower.benchmarks.harness import Column, on_free_ports, output_folder, text_table, write_report
from twotower.config import RecipeConfig, ServeConfig
from twotower.serving.client import user_id_request
from twotower.serving.triton import TritonServer
from twotower.store.artifacts import load_item_vectors, load_recipe_data


@dataclass(frozen=True)
class Phase:
    name: str
    users_per_request: int
    concurrency: int


def drive_requests(
    url: str, model: str, batches: list[np.ndarray], concurrency: int, timeout_s: float
) -> tuple[np.ndarray, int, float]:
    """Send every batch, ``concurrency`` at a time; latencies (ms), error count, wall seconds."""

    def worker(share: list[np.ndarray]) -> tuple[list[float], int]:
        latencies, errors = [], 0
        with grpcclient.InferenceServerClient(url) as client:
            for user_ids in share:
                started = time.perf_counter()
                try:
                    client.infer(model, [user_id_request(user_ids)], client_timeout=timeout_s)
                    latencies.append((time.perf_counter() - started) * 1000)
                except InferenceServerException:
                    errors += 1
        return latencies, errors

    shares = [batches[i::concurrency] for i in range(concurrency)]
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(worker, shares))
    wall = time.perf_counter() - started
    return np.array([ms for lat, _ in results for ms in lat]), sum(e for _, e in results), wall


def latency_summary(latencies: np.ndarray, errors: int, wall: float, users_per_request: int) -> dict[str, float]:
    ok = len(latencies)
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) if ok else (np.nan,) * 3
    return {
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "qps": ok / wall,
        "users_per_s": ok * users_per_request / wall,
        "requests": ok + errors,
        "errors": errors,
    }


def triton_model_stats(metrics_url: str, model: str) -> dict[str, float]:
    """Cumulative per-model counters from Triton's Prometheus endpoint."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    stats = {}
    for name in (
        "request_success",
        "request_failure",
        "count",  # users (rows) inferred
        "exec_count",  # executions of the model: fewer than requests when Triton batched them
        "request_duration_us",
        "queue_duration_us",
        "compute_infer_duration_us",
        "compute_input_duration_us",
        "compute_output_duration_us",
    ):
        match = re.search(rf'^nv_inference_{name}{{[^}}]*model="{model}"[^}}]*}} ([0-9.e+]+)$', text, re.MULTILINE)
        stats[name] = float(match.group(1)) if match else 0.0
    return stats


def _per_request_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    done = max(after["request_success"] - before["request_success"], 1)
    return {
        f"{name.removesuffix('_duration_us')}_ms": (after[name] - before[name]) / done / 1000
        for name in ("request_duration_us", "queue_duration_us", "compute_infer_duration_us")
    }


def user_batches(users: np.ndarray, count: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(users, size, replace=False).astype(np.int64) for _ in range(count)]


def warm_up(url: str, config: RecipeConfig, users: np.ndarray, concurrency: int = 1) -> None:
    """``benchmark.serving.warmup_requests`` single-user requests to the server at ``url``, untimed."""
    batches = user_batches(users, config.benchmark.serving.warmup_requests, 1, config.seed)
    drive_requests(url, config.serve.model_name, batches, concurrency, config.serve.client_timeout_s)


class ServerExited(RuntimeError):
    """The server died during a load phase (Triton 2.51's python backend was seen to abort once
    under the reference graph)."""


def measure_phase(
    server: TritonServer,
    model: str,
    batches: list[np.ndarray],
    concurrency: int,
    users_per_request: int,
    timeout_s: float,
) -> dict:
    """Send ``batches`` to ``server`` ``concurrency`` at a time: the latency summary, Triton's
    per-request times and the mean number of requests Triton handed an executor together."""
    before = triton_model_stats(server.metrics_url, model)
    latencies, errors, wall = drive_requests(server.grpc_url, model, batches, concurrency, timeout_s)
    if server.process.poll() is not None:
        raise ServerExited(f"tritonserver exited ({server.process.returncode}); see {server.log_path}")
    after = triton_model_stats(server.metrics_url, model)
    executions = max(after["exec_count"] - before["exec_count"], 1)
    return {
        **latency_summary(latencies, errors, wall, users_per_request),
        "triton": _per_request_ms(before, after),
        "requests_per_execution": (after["request_success"] - before["request_success"]) / executions,
    }


def run_phases(config: RecipeConfig, server: TritonServer, users: np.ndarray) -> dict[str, dict]:
    """Each load phase against ``server``; should the server die, the phase records why and the
    rest are skipped."""
    bench, model = config.benchmark, config.serve.model_name
    phases = [
        Phase("c1", 1, 1),
        Phase("c4", 1, 4),
        Phase("c16", 1, 16),
        Phase(f"batch{bench.serving.batch_users}_c1", bench.serving.batch_users, 1),
    ]
    timeout_s = config.serve.client_timeout_s
    warm_up(server.grpc_url, config, users)
    results = {}
    for phase in phases:
        count = (
            bench.serving.requests_per_phase
            if phase.users_per_request == 1
            else max(bench.serving.requests_per_phase // 10, 10)
        )
        batches = user_batches(users, count, phase.users_per_request, config.seed + 1)
        try:
            results[phase.name] = measure_phase(
                server, model, batches, phase.concurrency, phase.users_per_request, timeout_s
            )
        except ServerExited as exited:
            results[phase.name] = {"error": str(exited)}
            print(f"  {phase.name:<12} {exited}: later phases skipped")
            break
        print(
            f"  {phase.name:<12} p50 {results[phase.name]['p50_ms']:7.2f} ms  "
            f"p99 {results[phase.name]['p99_ms']:7.2f} ms  "
            f"{results[phase.name]['qps']:7.1f} req/s  errors {results[phase.name]['errors']}"
        )
    return results


def soak(config: RecipeConfig, url: str, users: np.ndarray) -> dict:
    """Good and malformed requests mixed for a bounded time; counts errors on good ones."""
    bench, model = config.benchmark, config.serve.model_name

    def fp32_request() -> list[grpcclient.InferInput]:
        request = grpcclient.InferInput("user_id", [1, 1], "FP32")
        request.set_data_from_numpy(np.array([[1.0]], dtype=np.float32))
        return [request]

    malformed = [
        lambda: [user_id_request(np.array([], dtype=np.int64))],
        lambda: [user_id_request(np.arange(config.serve.max_request_users + 1, dtype=np.int64))],
        fp32_request,
    ]
    deadline = time.monotonic() + bench.serving.soak_seconds
    timeout_s = config.serve.client_timeout_s

    def worker(worker_id: int) -> dict[str, int]:
        rng = np.random.default_rng(config.seed + worker_id)
        counts = {"good": 0, "good_errors": 0, "bad": 0, "bad_rejected": 0}
        with grpcclient.InferenceServerClient(url) as client:
            while time.monotonic() < deadline:
                if rng.random() < 0.2:
                    counts["bad"] += 1
                    try:
                        client.infer(model, malformed[rng.integers(len(malformed))](), client_timeout=timeout_s)
                    except InferenceServerException as error:
                        counts["bad_rejected"] += str(error.status()) == "StatusCode.INVALID_ARGUMENT"
                else:
                    counts["good"] += 1
                    try:
                        client.infer(
                            model, [user_id_request(rng.choice(users, 1).astype(np.int64))], client_timeout=timeout_s
                        )
                    except InferenceServerException:
                        counts["good_errors"] += 1
        return counts

    with ThreadPoolExecutor(bench.serving.soak_concurrency) as pool:
        results = list(pool.map(worker, range(bench.serving.soak_concurrency)))
    totals = {key: sum(r[key] for r in results) for key in results[0]}
    with grpcclient.InferenceServerClient(url) as client:
        totals["ready_after"] = bool(
            client.is_server_ready(client_timeout=timeout_s) and client.is_model_ready(model, client_timeout=timeout_s)
        )
    totals["seconds"] = bench.serving.soak_seconds
    return totals


def in_process_latency(export_dir: Path, users: np.ndarray, count: int) -> dict[str, float]:
    from twotower.serving.export import load_exported_ensemble, recommend_in_process

    ensemble = load_exported_ensemble(export_dir)
    for user in users[:20]:
        recommend_in_process(ensemble, np.array([user]))
    latencies = []
    for user in users[:count]:
        started = time.perf_counter()
        recommend_in_process(ensemble, np.array([user]))
        latencies.append((time.perf_counter() - started) * 1000)
    p50, p99 = np.percentile(latencies, [50, 99])
    return {"p50_ms": float(p50), "p99_ms": float(p99), "requests": len(latencies)}


def perf_analyzer_phases(config: RecipeConfig, url: str, users: np.ndarray, out_dir: Path) -> dict[str, dict]:
    """Triton's own load generator against the served model, single users at concurrency 1, 4, 16."""
    bench = config.benchmark
    rng = np.random.default_rng(config.seed)
    samples = [{"user_id": {"content": [int(u)], "shape": [1]}} for u in rng.choice(users, 500)]
    input_path = out_dir / "perf_analyzer_users.json"
    input_path.write_text(json.dumps({"data": samples}))
    results = {}
    for concurrency in (1, 4, 16):
        report = out_dir / f"perf_analyzer_c{concurrency}.csv"
        run = subprocess.run(
            [
                bench.serving.perf_analyzer,
                "-m",
                config.serve.model_name,
                "-u",
                url,
                "-i",
                "grpc",
                "--input-data",
                str(input_path),
                "--concurrency-range",
                str(concurrency),
                "--measurement-interval",
                str(bench.serving.perf_analyzer_interval_ms),
                "-f",
                str(report),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if run.returncode != 0:  # e.g. no stable window on a busy machine: a second opinion, not the benchmark
            reason = (run.stderr.strip() or run.stdout.strip() or "no output").splitlines()[-1]
            results[f"c{concurrency}"] = {"error": f"exit {run.returncode}: {reason}"}
            print(f"  perf_analyzer c{concurrency}: failed ({results[f'c{concurrency}']['error']})")
            continue
        with open(report) as handle:
            row = next(csv.DictReader(handle))
        results[f"c{concurrency}"] = {
            "p50_ms": float(row["p50 latency"]) / 1000,
            "p95_ms": float(row["p95 latency"]) / 1000,
            "p99_ms": float(row["p99 latency"]) / 1000,
            "qps": float(row["Inferences/Second"]),
        }
        print(
            f"  perf_analyzer c{concurrency}: p50 {results[f'c{concurrency}']['p50_ms']:.2f} ms  "
            f"p99 {results[f'c{concurrency}']['p99_ms']:.2f} ms  {results[f'c{concurrency}']['qps']:.1f} req/s"
        )
    return results


STAGES = {  # the recipe's operators, by the stage of a request they are
    "OnlineQueryFeatures": "feature_store_read",
    "PredictQueryTower": "query_tower",
    "RetrieveTopK": "index_search",
    "RetrieveByHeads": "index_search",
    "PrerankCandidates": "prerank",
}


def stage_breakdown(export_dir: Path, users: np.ndarray, count: int) -> dict[str, float]:
    """Where one single-user request's time goes in process: the p50 (ms) of each operator of the
    exported graph, of the seen-item lookup inside the index search (``seen_exclusion``), of the
    rest of Merlin's executor around them (``graph_overhead``) and of the whole request."""
    from merlin.dag import postorder_iter_nodes

    from twotower.serving.export import load_exported_ensemble, recommend_in_process

    ensemble = load_exported_ensemble(export_dir)
    spent: dict[str, float] = {}

    def timed(name: str, function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + (time.perf_counter() - started) * 1000

        return wrapper

    for node in postorder_iter_nodes(ensemble.graph.output_node, flatten_subgraphs=True):
        stage = STAGES.get(type(node.op).__name__)
        if stage:
            node.op.transform = timed(stage, node.op.transform)  # this loaded copy only
            if stage == "index_search" and hasattr(node.op.resource, "positions"):
                node.op.resource.positions = timed("seen_exclusion", node.op.resource.positions)
    samples: dict[str, list[float]] = {}
    for position, user in enumerate(users[: count + 20]):
        spent.clear()
        started = time.perf_counter()
        recommend_in_process(ensemble, np.array([user]))
        total = (time.perf_counter() - started) * 1000
        if position < 20:  # warm-up
            continue
        stages = {**spent, "index_search": spent["index_search"] - spent.get("seen_exclusion", 0.0)}
        stages["graph_overhead"] = total - sum(stages.values())
        for name, ms in {**stages, "in_process_total": total}.items():
            samples.setdefault(name, []).append(ms)
    return {name: float(np.median(values)) for name, values in samples.items()}


def settings_sweep(config: RecipeConfig, users: np.ndarray, out_dir: Path) -> dict[str, dict]:
    """The recipe's graph on a copy of its export under other serving settings, single users at
    concurrency 1 and 16 (p50, p99, users/s, and the mean number of requests Triton handed an
    executor together): each of ``benchmark.serving.queue_delays_us`` (-1: no dynamic batcher) at
    ``serve.instance_count``, then each of ``benchmark.serving.instance_counts`` at
    ``serve.max_queue_delay_us``."""
    from twotower.serving.export import export_ensemble
    from twotower.serving.graph import recipe_ensemble

    bench, serve = config.benchmark.serving, on_free_ports(config.serve)
    repository = export_ensemble(recipe_ensemble(config), out_dir / "sweep_models", serve)
    delays = {
        "off" if delay < 0 else f"{delay}us": dataclasses.replace(
            serve, dynamic_batching=delay >= 0, max_queue_delay_us=max(delay, 0)
        )
        for delay in bench.queue_delays_us
    }
    instances = {str(count): dataclasses.replace(serve, instance_count=count) for count in bench.instance_counts}
    print(f"[benchmark] queue delays at {serve.instance_count} instance(s), instances at {serve.max_queue_delay_us} us")
    return {
        "queue_delay_us": {
            label: _sweep_point(config, repository, settings, users, out_dir, f"delay {label}")
            for label, settings in delays.items()
        },
        "instance_count": {
            label: _sweep_point(config, repository, settings, users, out_dir, f"instances {label}")
            for label, settings in instances.items()
        },
    }


def _sweep_point(
    config: RecipeConfig, repository: Path, settings: ServeConfig, users: np.ndarray, out_dir: Path, label: str
) -> dict[str, dict]:
    from twotower.serving.export import apply_serving_settings

    bench, model, timeout_s = config.benchmark.serving, config.serve.model_name, config.serve.client_timeout_s
    apply_serving_settings(repository / model, settings)
    result = {}
    with TritonServer(repository, out_dir / "triton-sweep", settings) as server:
        warm_up(server.grpc_url, config, users)
        for concurrency in (1, 16):
            batches = user_batches(users, bench.requests_per_phase, 1, config.seed + 1)
            result[f"c{concurrency}"] = measure_phase(server, model, batches, concurrency, 1, timeout_s)
    print(
        f"  {label:>14}: c1 p50 {result['c1']['p50_ms']:.2f} ms; c16 {result['c16']['users_per_s']:.0f} users/s, "
        f"p99 {result['c16']['p99_ms']:.2f} ms, {result['c16']['requests_per_execution']:.1f} requests an execution"
    )
    return result


def export_reference(config: RecipeConfig, out_dir: Path) -> Path:
    """The NVIDIA example's graph over the same model: Feast SDK, per-request NVTabular, IVF32."""
    from twotower.benchmarks.support.reference_graph import build_reference_ensemble
    from twotower.serving.export import export_ensemble
    from twotower.stages.index import build_reference_index
    from twotower.store.index import save_index

    index_path = out_dir / "reference_ivf32.faiss"
    save_index(build_reference_index(*load_item_vectors(config.item_vectors_path)), index_path)
    ensemble = build_reference_ensemble(
        config.feature_repo_dir,
        config.workflow_dir / "user",
        config.query_tower_dir,
        index_path,
        config.serve.top_k,
        config.serve.max_request_users,
    )
    return export_ensemble(ensemble, out_dir / "reference_models", config.serve)


def _print_table(phases: dict[str, dict]) -> None:
    columns = [
        Column("phase", 14),
        Column("graph", 11),
        Column("p50 ms", 9, ".2f"),
        Column("p95 ms", 9, ".2f"),
        Column("p99 ms", 9, ".2f"),
        Column("req/s", 9, ".1f"),
        Column("users/s", 9, ".1f"),
        Column("errors", 8, "d"),
        Column("triton compute ms", 19, ".2f"),
    ]
    rows = [
        [phase, f"{graph:<11}", r["p50_ms"], r["p95_ms"], r["p99_ms"], r["qps"], r["users_per_s"], r["errors"]]
        + [r["triton"]["compute_infer_ms"]]
        if "error" not in r
        else [phase, f"{graph:<11}", *[None] * 7]  # the server had exited: '-' across
        for phase, graphs in phases.items()
        for graph, r in graphs.items()
    ]
    print("\n" + text_table(columns, rows))


def run_serving_benchmark(config: RecipeConfig) -> Path:
    from twotower.serving.export import served_settings

    out_dir = output_folder(config, "serving")
    users = load_recipe_data(config.data_dir).users["user_id"].to_numpy()
    # Free ports picked at start: a stale server on the usual ports can never be measured instead.
    serve = on_free_ports(config.serve)

    graphs = {"recipe": config.export_dir, "reference": export_reference(config, out_dir)}
    by_graph, soak_result, perf_analyzer = {}, None, None
    for graph, model_repository in graphs.items():
        print(f"[benchmark] {graph} graph from {model_repository}")
        with TritonServer(model_repository, out_dir / f"triton-{graph}", serve) as server:
            url = server.grpc_url
            print(f"  tritonserver pid {server.process.pid} on {url}, serving {model_repository}")
            by_graph[graph] = run_phases(config, server, users)
            if graph == "recipe":
                if config.benchmark.serving.perf_analyzer:
                    perf_analyzer = perf_analyzer_phases(config, url, users, out_dir)
                soak_result = soak(config, url, users)
                print(f"  soak {soak_result}")
    not_run = {"error": "not run: the server had exited"}
    phases = {phase: {graph: by_graph[graph].get(phase, not_run) for graph in graphs} for phase in by_graph["recipe"]}
    sweep = settings_sweep(config, users, out_dir)
    breakdown = stage_breakdown(config.export_dir, users, config.benchmark.serving.breakdown_requests)
    breakdown["triton_and_grpc"] = phases["c1"]["recipe"]["p50_ms"] - breakdown["in_process_total"]
    report = {
        "date": date.today().isoformat(),
        "dataset": config.data.dataset,
        "top_k": config.serve.top_k,
        "settings": served_settings(config.export_dir / config.serve.model_name),  # as exported
        "phases": phases,
        # p50 of each stage of one single-user request (in process), and what Triton and gRPC add at c1
        "breakdown_ms": breakdown,
        "settings_sweep": sweep,
        # The same graphs without Triton: what the served ratio should be close to.
        "in_process": {
            graph: in_process_latency(model_repository, users, min(config.benchmark.serving.requests_per_phase, 1000))
            for graph, model_repository in graphs.items()
        },
        "soak": soak_result,
        "perf_analyzer_recipe": perf_analyzer,
        "p50_ratio_reference_over_recipe_c1": phases["c1"]["reference"].get("p50_ms", np.nan)
        / phases["c1"]["recipe"]["p50_ms"],
    }
    report["p50_ratio_reference_over_recipe_in_process"] = (
        report["in_process"]["reference"]["p50_ms"] / report["in_process"]["recipe"]["p50_ms"]
    )
    _print_table(phases)
    print("\n" + text_table([Column("stage (single user, p50)", 26), Column("ms", 8, ".3f")], breakdown.items()))
    for graph, result in report["in_process"].items():
        print(
            f"\nin-process DAG (no Triton), {graph}, single user: "
            f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms",
            end="",
        )
    print(
        "\nreference p50 / recipe p50 at concurrency 1: "
        f"{report['p50_ratio_reference_over_recipe_c1']:.1f}x through Triton, "
        f"{report['p50_ratio_reference_over_recipe_in_process']:.1f}x in process"
    )
    json_path = write_report(report, out_dir / "serving.json")
    print(json_path)
    return json_path

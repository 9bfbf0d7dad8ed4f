"""``make benchmark-faults``: the served recipe under faults, against real processes.

On a copy of the run whose Feast online store is an owned, persistent redis-server:

1. **Redis gap**: single-user requests at concurrency ``fault_concurrency``; Redis is
   stopped ``fault_gap_s`` seconds into the soak and started again ``fault_gap_s``
   later. Requests in the gap must fail fast with a clear error; after it they must
   succeed again with the same Triton server.
2. **Triton SIGKILL**: the server is killed and a new one started on the same model
   repository; its answers must equal the old one's.
3. **Stage killed halfway**: ``twotower features`` is killed mid-way and re-run; the
   export and the answers must be the same as before.
4. **Memory soak**: ``fault_soak_seconds`` of good requests; server RSS (tritonserver and
   its python backend stubs) before and after.
5. **A Redis Cluster node gap**: on another copy whose store is a three-node Redis Cluster
   (persistent nodes), one node is stopped and started again as Redis is in 1.

Every answer is checked against the one the healthy server gave for that user: the
counts are good, clear errors, wrong answers (must be 0) and hangs (no answer within
the client timeout; must be 0). Prints a table, saves a plot, and writes JSON whose
path is the last line printed.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from matplotlib.figure import Figure
from tritonclient.utils import InferenceServerException

from twotower import pipeline
from twotower.benchmarks.harness import on_free_ports, output_folder, write_report
from twotower.benchmarks.support.redis_server import (
    RedisClusterServers,
    RedisServer,
    require_redis_cli,
    require_redis_server,
)
from twotower.config import FeaturesConfig, RecipeConfig
from twotower.serving.client import demo_users, user_id_request
from twotower.serving.triton import TritonServer, command_line, process_group

OUTCOMES = ("good", "clear_error", "wrong", "hang")
CLEAR_ERROR_STATUSES = {"StatusCode.UNAVAILABLE", "StatusCode.INVALID_ARGUMENT", "StatusCode.INTERNAL"}
HANG_STATUS = "StatusCode.DEADLINE_EXCEEDED"


@dataclasses.dataclass
class Outcome:
    at_s: float  # since the soak started
    kind: str
    latency_ms: float
    message: str = ""


def process_rss_mb(leader_pid: int) -> dict[str, float]:
    """Resident memory (MB) of every live process in ``leader_pid``'s process group (the server and
    its python backend stubs), keyed by program name and pid."""
    rss = {}
    for pid in process_group(leader_pid):
        command = command_line(pid)
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        program = Path(command[0]).name if command else "exited"  # a zombie has no command line
        kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        rss[f"{program} {pid}"] = kb / 1024
    return rss


def growth_after_warmup(samples: list[tuple[float, dict[str, float]]], warmup_s: float) -> dict[str, float]:
    """Each process's RSS growth (%) from the first sample at or after ``warmup_s`` to the last."""
    start = next((rss for at, rss in samples if at >= warmup_s), samples[-1][1])
    end = samples[-1][1]
    return {name: 100 * (end[name] - mb) / mb for name, mb in start.items() if name in end and mb}


def answers(url: str, model: str, users: np.ndarray, timeout_s: float) -> np.ndarray:
    """Top-k item ids per user, one batch request."""
    with grpcclient.InferenceServerClient(url) as client:
        return client.infer(model, [user_id_request(users.astype(np.int64))], client_timeout=timeout_s).as_numpy(
            "item_ids"
        )


def soak(
    url: str,
    model: str,
    expected: dict[int, np.ndarray],
    seconds: float,
    concurrency: int,
    timeout_s: float,
    seed: int,
    started: float | None = None,
) -> list[Outcome]:
    """Single-user requests for ``seconds`` from ``started`` (a monotonic time; default now),
    each answer classified against ``expected``."""
    users = np.array(sorted(expected))
    started = time.monotonic() if started is None else started

    def worker(worker_id: int) -> list[Outcome]:
        rng = np.random.default_rng(seed + worker_id)
        outcomes = []
        with grpcclient.InferenceServerClient(url) as client:
            while (now := time.monotonic()) - started < seconds:
                user = int(rng.choice(users))
                try:
                    result = client.infer(
                        model, [user_id_request(np.array([user], dtype=np.int64))], client_timeout=timeout_s
                    )
                    answer = result.as_numpy("item_ids")[0]
                    kind = "good" if np.array_equal(answer, expected[user]) else "wrong"
                    message = (
                        "" if kind == "good" else f"user {user}: {answer.tolist()} instead of {expected[user].tolist()}"
                    )
                except InferenceServerException as error:
                    status, message = str(error.status()), str(error.message())
                    clear = (
                        status in CLEAR_ERROR_STATUSES and "\n" not in message.strip() and "Traceback" not in message
                    )
                    kind = "hang" if status == HANG_STATUS else "clear_error" if clear else "wrong"
                outcomes.append(Outcome(now - started, kind, (time.monotonic() - now) * 1000, message))
        return outcomes

    with ThreadPoolExecutor(concurrency) as pool:
        return sorted((o for batch in pool.map(worker, range(concurrency)) for o in batch), key=lambda o: o.at_s)


def counts(outcomes: list[Outcome]) -> dict[str, int]:
    return {kind: sum(o.kind == kind for o in outcomes) for kind in OUTCOMES}


def redis_gap(server: TritonServer, redis: RedisServer, config: RecipeConfig, expected: dict[int, np.ndarray]) -> dict:
    bench, serve = config.benchmark, config.serve
    gap = bench.faults.gap_s
    started = time.monotonic()
    with ThreadPoolExecutor(1) as background:
        running = background.submit(
            soak,
            server.grpc_url,
            serve.model_name,
            expected,
            3 * gap,
            bench.faults.concurrency,
            serve.client_timeout_s,
            config.seed,
            started,
        )
        time.sleep(gap)
        stopped_at = time.monotonic() - started
        redis.stop()
        time.sleep(max(gap - (time.monotonic() - started - stopped_at), 0))
        redis.start()
        restarted_at = time.monotonic() - started  # Redis answers again from here
        outcomes = running.result()
    before = [o for o in outcomes if o.at_s < stopped_at]
    during = [o for o in outcomes if stopped_at <= o.at_s < restarted_at]
    after = [o for o in outcomes if o.at_s >= restarted_at]
    gap_errors = [o for o in during if o.kind == "clear_error"]
    return {
        "before": counts(before),
        "during": counts(during),
        "after": counts(after),
        "gap_error_p99_ms": float(np.percentile([o.latency_ms for o in gap_errors], 99)) if gap_errors else None,
        "gap_error_messages": sorted({o.message for o in gap_errors})[:5],
        # what a wrong outcome was (an unclear error's text, or the answer unlike the healthy one), and when
        "wrong": [(round(o.at_s - stopped_at, 3), o.message[:300]) for o in outcomes if o.kind == "wrong"][:10],
        "stopped_at_s": stopped_at,
        "restarted_at_s": restarted_at,
        "first_good_after_restart_s": next((o.at_s - restarted_at for o in after if o.kind == "good"), None),
        "timeline": [(round(o.at_s, 3), o.kind) for o in outcomes],
    }


def cluster_node_gap(config: RecipeConfig, out_dir: Path, users: list[int]) -> dict:
    """``redis_gap`` with the store on a three-node Redis Cluster and one node stopped: users whose
    rows live on it are refused at once, every user once the cluster counts the node as failed."""
    serve = config.serve
    with RedisClusterServers(out_dir / "redis-cluster", persistent=True) as cluster:
        print(f"[faults] the run on a Redis Cluster ({cluster.connection}); one node stopped mid-soak", flush=True)
        run = _copy_run(config, out_dir / "run-cluster", FeaturesConfig("redis_cluster", cluster.connection))
        with TritonServer(run.export_dir, out_dir / "triton-cluster", run.serve) as server:
            baseline = answers(server.grpc_url, serve.model_name, np.array(users), serve.client_timeout_s)
            return redis_gap(server, cluster.servers[0], run, dict(zip(users, baseline)))


def sigkill_and_restart(
    server: TritonServer, config: RecipeConfig, users: np.ndarray, before: np.ndarray
) -> tuple[TritonServer, dict]:
    server.process.send_signal(signal.SIGKILL)
    server.stop()  # reaps it and takes its orphaned stubs
    started = time.monotonic()
    replacement = TritonServer(server.model_repository, server.work_dir, server.config).start()
    restart_s = time.monotonic() - started
    after = answers(replacement.grpc_url, config.serve.model_name, users, config.serve.client_timeout_s)
    return replacement, {
        "restart_s": restart_s,
        "users": len(users),
        "same_answers": bool(np.array_equal(before, after)),
    }


def _stage_command(run: RecipeConfig, stage: str) -> list[str]:
    overrides = {
        "output_dir": run.output_dir,
        "export_dir": run.export_dir,
        "features.online_store": run.features.online_store,
        "features.redis_connection": run.features.redis_connection,
    }
    return [sys.executable, "-m", "twotower", stage, *(a for k, v in overrides.items() for a in ("--set", f"{k}={v}"))]


def kill_stage_and_rerun(run: RecipeConfig, stage: str, kill_after_s: float) -> dict:
    """Kill ``twotower <stage>`` after ``kill_after_s``, then check the previous run still exports, re-run it."""
    process = subprocess.Popen(_stage_command(run, stage), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(kill_after_s)
    killed_mid_way = process.poll() is None
    process.kill()
    process.wait()
    pipeline.run_export(run)  # refuses if the killed stage left parts that disagree
    started = time.monotonic()
    subprocess.run(
        _stage_command(run, stage), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=3600
    )
    pipeline.run_export(run)
    return {
        "stage": stage,
        "killed_after_s": kill_after_s,
        "killed_mid_way": killed_mid_way,
        "rerun_s": time.monotonic() - started,
    }


def _copy_run(config: RecipeConfig, run_dir: Path, features: FeaturesConfig) -> RecipeConfig:
    """The run's outputs copied under ``run_dir``, Feast re-materialized into the store ``features``
    names, exported."""
    run = dataclasses.replace(config, output_dir=run_dir / "artifacts", export_dir=run_dir / "triton_models")
    run.features = features
    run.serve = on_free_ports(config.serve)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    shutil.copytree(config.output_dir, run.output_dir, ignore=shutil.ignore_patterns("benchmark-*", "triton"))
    pipeline.run_features(run)
    pipeline.run_export(run)
    return run


def plot_faults(gap: dict, rss: list[tuple[float, dict[str, float]]], path: Path) -> Figure:
    fig = Figure(figsize=(11, 4))
    outcome_ax, rss_ax = fig.subplots(1, 2)
    times = np.array([t for t, _ in gap["timeline"]])
    bins = np.arange(0, (times.max() if len(times) else 0) + 1)
    for kind in OUTCOMES:
        outcome_ax.hist(times[[k == kind for _, k in gap["timeline"]]], bins=bins, histtype="step", label=kind)
    outcome_ax.axvspan(gap["stopped_at_s"], gap["restarted_at_s"], color="grey", alpha=0.2, label="Redis stopped")
    outcome_ax.set(title="requests per second around a Redis outage", xlabel="seconds", ylabel="requests")
    outcome_ax.legend()
    for name in rss[0][1]:
        rss_ax.plot(
            [t / 60 for t, _ in rss], [by_process.get(name, np.nan) for _, by_process in rss], marker=".", label=name
        )
    rss_ax.set(title="server RSS during the soak", xlabel="minutes", ylabel="MB")
    rss_ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return fig


def memory_soak(
    server: TritonServer, config: RecipeConfig, expected: dict[int, np.ndarray]
) -> tuple[dict, list[tuple[float, dict[str, float]]]]:
    bench, serve = config.benchmark, config.serve
    samples = [(0.0, process_rss_mb(server.process.pid))]
    slices = max(int(bench.faults.soak_seconds // 30), 1)
    outcomes: list[Outcome] = []
    for index in range(slices):  # RSS sampled between slices of the soak
        outcomes += soak(
            server.grpc_url,
            serve.model_name,
            expected,
            bench.faults.soak_seconds / slices,
            bench.faults.concurrency,
            serve.client_timeout_s,
            config.seed + index,
        )
        samples.append(((index + 1) * bench.faults.soak_seconds / slices, process_rss_mb(server.process.pid)))
        print(
            f"  soak {samples[-1][0]:6.0f}/{bench.faults.soak_seconds:.0f} s  "
            f"RSS {sum(samples[-1][1].values()):7.1f} MB  {counts(outcomes)}",
            flush=True,
        )
    return {
        "seconds": bench.faults.soak_seconds,
        **counts(outcomes),
        "rss_mb_before": sum(samples[0][1].values()),
        "rss_mb_after": sum(samples[-1][1].values()),
        "rss_mb": {f"{at:.0f}": by_process for at, by_process in samples},
        "warmup_s": bench.faults.soak_warmup_s,
        "rss_growth_pct_after_warmup": growth_after_warmup(samples, bench.faults.soak_warmup_s),
    }, samples


def run_fault_benchmark(config: RecipeConfig) -> Path:
    require_redis_server()
    require_redis_cli()  # the Redis Cluster phase comes last: refuse before the rest's half hour
    out_dir = output_folder(config, "faults")
    bench, serve = config.benchmark, config.serve
    users = demo_users(config, bench.faults.sample_users)
    report: dict = {
        "date": date.today().isoformat(),
        "dataset": config.data.dataset,
        "concurrency": bench.faults.concurrency,
    }
    with RedisServer(out_dir / "redis", persistent=True) as redis:
        print(f"[faults] copying the run and materializing Feast into redis-server pid {redis.process.pid}", flush=True)
        run = _copy_run(config, out_dir / "run", FeaturesConfig("redis", redis.connection))
        server = TritonServer(run.export_dir, out_dir / "triton", run.serve).start()
        try:
            baseline = answers(server.grpc_url, serve.model_name, np.array(users), serve.client_timeout_s)
            expected = dict(zip(users, baseline))
            print(
                f"[faults] Redis stopped {bench.faults.gap_s:.0f} s in the middle of a soak "
                f"at concurrency {bench.faults.concurrency}",
                flush=True,
            )
            report["redis_gap"] = redis_gap(server, redis, run, expected)
            print("[faults] Triton killed with SIGKILL and restarted", flush=True)
            server, report["triton_sigkill"] = sigkill_and_restart(server, run, np.array(users), baseline)
            print(f"[faults] soak of {bench.faults.soak_seconds:.0f} s for memory", flush=True)
            report["memory_soak"], rss = memory_soak(server, run, expected)
        finally:
            server.stop()
        print("[faults] 'features' killed mid-way and re-run", flush=True)
        report["stage_killed"] = kill_stage_and_rerun(run, "features", bench.faults.stage_kill_after_s)
        with TritonServer(run.export_dir, out_dir / "triton", run.serve) as server:
            rerun = answers(server.grpc_url, serve.model_name, np.array(users), serve.client_timeout_s)
        report["stage_killed"]["same_answers"] = bool(np.array_equal(rerun, baseline))
    report["cluster_node_gap"] = cluster_node_gap(config, out_dir, users)
    plot_faults(report["redis_gap"], rss, out_dir / "faults.png")
    _print_report(report)
    path = write_report(report, out_dir / "faults.json")
    print(path)
    return path


def _print_report(report: dict) -> None:
    gap = report["redis_gap"]
    print(f"\n{'phase':<28}" + "".join(f"{k:>13}" for k in OUTCOMES))
    for name in ("before", "during", "after"):
        print(f"{'redis gap: ' + name:<28}" + "".join(f"{gap[name][k]:>13}" for k in OUTCOMES))
    soak_counts = report["memory_soak"]
    print(f"{'soak':<28}" + "".join(f"{soak_counts[k]:>13}" for k in OUTCOMES))
    node_gap = report["cluster_node_gap"]
    for name in ("before", "during", "after"):
        print(f"{'cluster node gap: ' + name:<28}" + "".join(f"{node_gap[name][k]:>13}" for k in OUTCOMES))
    p99 = gap["gap_error_p99_ms"]
    print(
        f"\nerrors during the Redis gap: p99 {p99:.1f} ms"
        if p99 is not None
        else "\nno request ran during the Redis gap"
    )
    print(
        f"  e.g. {gap['gap_error_messages'][:1]}; "
        f"first good answer {gap['first_good_after_restart_s']} s after Redis came back"
    )
    print(
        f"cluster node gap: e.g. {node_gap['gap_error_messages'][:1]}; "
        f"first good answer {node_gap['first_good_after_restart_s']} s after the node came back"
    )
    kill = report["triton_sigkill"]
    print(
        f"Triton SIGKILL: restarted in {kill['restart_s']:.1f} s, "
        f"same answers for {kill['users']} users: {kill['same_answers']}"
    )
    stage = report["stage_killed"]
    print(
        f"'{stage['stage']}' killed after {stage['killed_after_s']:.0f} s (mid-way: {stage['killed_mid_way']}), "
        f"re-run in {stage['rerun_s']:.1f} s, same answers: {stage['same_answers']}"
    )
    print(
        f"server RSS {soak_counts['rss_mb_before']:.0f} MB before, {soak_counts['rss_mb_after']:.0f} MB after "
        f"{soak_counts['seconds']:.0f} s of soak; growth after {soak_counts['warmup_s']:.0f} s by process: "
        + ", ".join(f"{name} {pct:+.2f}%" for name, pct in soak_counts["rss_growth_pct_after_warmup"].items())
    )

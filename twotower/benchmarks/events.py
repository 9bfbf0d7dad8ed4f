"""``make benchmark-events``: live events measured (docs/events.md).

Three parts, in one run:

1. **Under load**: the run's exported model on a real Triton server, its live events written to
   this benchmark's own folder (``TWOTOWER_EVENTS_DIR``; the run's event log, which is training
   data, is never touched). Recommend requests from ``concurrency`` clients, first alone, then
   twice with ``event_senders`` clients sending events as fast as they are answered (one event a
   request, then ``event_batch_rows``): users/s and latency of both, so what recording events
   costs the recommend endpoint shows beside what it sustains.
2. **Event to changed answer**: for sampled users, send an event of the top item of their answer
   and ask again at once, until that item is gone: the time from the event's OK to the changed
   answer, and how many requests it took (one, if the next request sees the event).
3. **What freshness buys**: on the run's data, for ``two_tower`` and the best sequence tower, each
   trained in a run of its own, the test period's positives replayed in time order as events:
   each is ranked against the catalogue (the user's earlier items excluded) from the history as
   of training (what the server answers without events) and from the live history (with the
   user's earlier test positives folded in, as ``serving/ops/live.py`` folds events), and, to
   separate the two effects, from the history as of training with the events in the excluded
   items only. HR@10 and NDCG@10, the next-item protocol.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from twotower.benchmarks.harness import Column, derived_run, on_free_ports, output_folder, text_table, write_report
from twotower.benchmarks.serving import drive_requests, latency_summary, user_batches, warm_up
from twotower.config import RecipeConfig
from twotower.serving.client import recommend, send_events
from twotower.serving.events import EVENTS_DIR_ENV
from twotower.serving.triton import TritonServer
from twotower.stages.data import latest_history
from twotower.store.artifacts import (
    ServingSignature,
    call_signature,
    known_before_test,
    load_item_vectors,
    load_recipe_data,
    load_split,
)
from twotower.store.events import deploy_live_store

# The test period's rows a replayed target is ranked from, by what of them the user's row has.
ARMS = {
    "as_of_training": "as of training (no events)",
    "live_seen_items_only": "events in seen_items only",
    "live": "events in seen_items and history",
}


class EventSenders:
    """``count`` clients sending ``rows`` events a request (random users and items, the time now),
    as fast as they are answered, until stopped."""

    def __init__(
        self, url: str, users: np.ndarray, items: np.ndarray, count: int, rows: int, seed: int, timeout_s: float
    ):
        self.url, self.users, self.items, self.rows, self.timeout_s = url, users, items, rows, timeout_s
        self.latencies: list[float] = []
        self.errors = 0
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._send, args=(seed + n,)) for n in range(count)]

    def _send(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self.stop.is_set():
            users, items = rng.choice(self.users, self.rows), rng.choice(self.items, self.rows)
            started = time.perf_counter()
            try:
                send_events(users, items, np.full(self.rows, int(time.time())), None, self.url, self.timeout_s)
                with self._lock:
                    self.latencies.append((time.perf_counter() - started) * 1000)
            except Exception:  # noqa: BLE001 - every failure is counted, whatever it is
                with self._lock:
                    self.errors += 1

    def __enter__(self) -> EventSenders:
        self.started = time.perf_counter()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join()
        self.wall = time.perf_counter() - self.started


def under_load(config: RecipeConfig, url: str, users: np.ndarray, items: np.ndarray) -> dict[str, dict]:
    """Part 1 (module docstring)."""
    bench, model, timeout_s = config.benchmark.events, config.serve.model_name, config.serve.client_timeout_s
    warm_up(url, config, users, bench.concurrency)
    batches = user_batches(users, bench.requests, 1, config.seed + 1)
    print(f"[benchmark] {bench.requests:,} recommend requests at concurrency {bench.concurrency}, alone", flush=True)
    results = {"recommend": latency_summary(*drive_requests(url, model, batches, bench.concurrency, timeout_s), 1)}
    for rows in (1, bench.event_batch_rows):
        print(f"[benchmark] again, with {bench.event_senders} clients sending {rows} event(s) a request", flush=True)
        with EventSenders(url, users, items, bench.event_senders, rows, config.seed, timeout_s) as senders:
            recommended = drive_requests(url, model, batches, bench.concurrency, timeout_s)
        results[f"recommend_with_events_x{rows}"] = latency_summary(*recommended, 1)
        results[f"events_x{rows}"] = latency_summary(np.array(senders.latencies), senders.errors, senders.wall, rows)
    return results


def event_to_changed_answer(config: RecipeConfig, url: str, users: np.ndarray) -> dict[str, float]:
    """Part 2 (module docstring)."""
    bench, timeout_s = config.benchmark.events, config.serve.client_timeout_s
    sample = np.random.default_rng(config.seed + 2).choice(users, min(bench.changed_answer_users, len(users)), False)
    waits, attempts = [], []
    for user in sample.tolist():
        top = recommend([user], url, config.serve.model_name, timeout_s)["item_ids"][0, 0]
        send_events([user], [top], [int(time.time())], None, url, timeout_s)
        acknowledged = time.perf_counter()
        for attempt in range(1, bench.changed_answer_attempts + 1):
            if top not in recommend([user], url, config.serve.model_name, timeout_s)["item_ids"][0]:
                waits.append((time.perf_counter() - acknowledged) * 1000)
                attempts.append(attempt)
                break
    return {
        "users": len(sample),
        "changed": len(waits),
        "changed_on_first_request": int(sum(a == 1 for a in attempts)),
        "p50_ms": float(np.percentile(waits, 50)) if waits else float("nan"),
        "p99_ms": float(np.percentile(waits, 99)) if waits else float("nan"),
    }


def replayed_targets(split, history_length: int, max_targets: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The test period's positives in time order per user (at most ``max_targets``, whole users
    drawn at random), and for each of them, as its own query row (``query``), the history a live
    server holds when it arrives: the user's latest known positives then their earlier test ones."""
    test = split.test.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(drop=True)
    users = np.random.default_rng(seed).permutation(test["user_id"].unique())
    kept = users[np.cumsum(test.groupby("user_id").size().reindex(users).to_numpy()) <= max_targets]
    test = test[test["user_id"].isin(kept)].reset_index(drop=True)
    test["query"] = np.arange(len(test))
    test["position"] = test.groupby("user_id").cumcount()
    known = known_before_test(split).sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    latest = known[known["user_id"].isin(kept)].groupby("user_id").tail(max(history_length, 1))
    rows = []
    for _, targets in test.groupby("user_id"):  # each target: the known tail, then the test items before it
        user_known = latest[latest["user_id"] == targets["user_id"].iloc[0]]
        for query, position in zip(targets["query"], targets["position"]):
            earlier = targets.iloc[:position]
            rows.append(pd.concat([user_known, earlier[user_known.columns]]).assign(query=query))
    live = pd.concat(rows, ignore_index=True)
    return test, live


def live_query_vectors(run: RecipeConfig, users: pd.DataFrame, test: pd.DataFrame, live_rows: pd.DataFrame):
    """A query vector per replayed target: the user's own profile (their id is a feature of some
    towers) with the live history of that moment (``live_rows``, keyed by the target's ``query``)."""
    from twotower.stages.workflow import encode_users, load_saved_workflows

    rows = users.set_index("user_id").loc[test["user_id"]].reset_index()
    if run.train.history_length > 0:
        histories = latest_history(live_rows, test["query"].to_numpy(), run.train.history_length)
        rows = rows.assign(history=histories.to_numpy())
    return call_signature(
        ServingSignature(run.query_tower_dir), encode_users(load_saved_workflows(run.workflow_dir), rows)
    )


def freshness(config: RecipeConfig, out_dir: Path) -> dict[str, dict]:
    """Part 3 (module docstring): one run per model, HR@10/NDCG@10 with histories as of training
    against live histories."""
    from twotower import pipeline
    from twotower.benchmarks.sequential import ranking_metrics
    from twotower.stages.evaluate import query_vectors_of

    bench = config.benchmark.events
    results = {}
    for model in bench.models:
        run = derived_run(config, out_dir / f"run-{model}", {"model.name": model})
        for stage in ("data", "workflow", "train"):
            pipeline.run_stage(stage, run)
        data, split = load_recipe_data(run.data_dir), load_split(run.splits_dir)
        item_ids, item_vectors = load_item_vectors(run.item_vectors_path)
        position = pd.Series(np.arange(len(item_ids)), index=item_ids)
        test, live = replayed_targets(split, run.train.history_length, bench.max_targets, run.seed)
        outside = ~test["item_id"].isin(item_ids)  # never trained on: neither arm can rank it
        test = test[~outside].reset_index(drop=True)
        live = live[live["query"].isin(test["query"])]
        known = known_before_test(split)
        as_trained = query_vectors_of(run, data.users, known, test["user_id"].to_numpy())
        live_rows = live.assign(user_id=live["query"])
        fresh = live_query_vectors(run, data.users, test, live_rows)
        seen_known = known.groupby("user_id")["item_id"].agg(list)
        seen_live = live_rows.groupby("user_id")["item_id"].agg(list)  # with seen_known: every earlier item
        row, ranks_of = {}, {}
        for name, vectors, extra in (
            ("as_of_training", as_trained, None),
            ("live_seen_items_only", as_trained, seen_live),
            ("live", fresh, seen_live),
        ):
            target_ranks = np.empty(len(test), np.int64)
            for start in range(0, len(test), 1024):
                part = test.iloc[start : start + 1024]
                scores = vectors[start : start + 1024] @ item_vectors.T
                target = position.reindex(part["item_id"]).to_numpy()
                target_scores = scores[np.arange(len(part)), target]
                for offset, (user, query) in enumerate(zip(part["user_id"], part["query"])):
                    seen = list(seen_known.get(user, []))
                    if extra is not None:
                        seen += list(extra.get(query, []))
                    columns = position.reindex(seen).dropna().astype(int).to_numpy()
                    scores[offset, columns[columns != target[offset]]] = -np.inf
                target_ranks[start : start + len(part)] = (scores > target_scores[:, None]).sum(axis=1)
            row[name] = {k: v for k, v in ranking_metrics(target_ranks).items() if k.endswith("@10")}
            ranks_of[name] = target_ranks
        # A user's first test positive has no earlier one to fold in: both arms must rank it alike
        # (a check of the replay itself, the query rows built per target against the served rows).
        first = (test["position"] == 0).to_numpy()
        row["first_targets_ranked_alike"] = float(np.mean(ranks_of["live"][first] == ranks_of["as_of_training"][first]))
        row["targets"], row["targets_outside_catalogue"] = len(test), int(outside.sum())
        results[model] = row
        print(
            f"[benchmark] {model}: HR@10 as of training {row['as_of_training']['hr@10']:.4f}, "
            f"live {row['live']['hr@10']:.4f} ({len(test):,} test positives replayed)",
            flush=True,
        )
    return results


def plot_freshness(freshness: dict[str, dict]) -> Figure:
    """HR@10 and NDCG@10 of each model, a bar for each of ``ARMS``."""
    fig = Figure(figsize=(10, 3.8))
    positions = np.arange(len(freshness))
    width = 0.8 / len(ARMS)
    for ax, metric in zip(fig.subplots(1, 2), ("hr@10", "ndcg@10")):
        for n, (arm, label) in enumerate(ARMS.items()):
            values = [result[arm][metric] for result in freshness.values()]
            bars = ax.bar(positions + (n - (len(ARMS) - 1) / 2) * width, values, width, label=label)
            ax.bar_label(bars, fmt="%.3f", fontsize=7)
        ax.set_xticks(positions, list(freshness))
        ax.set_title(f"{metric.upper()} of the test period replayed as events")
    fig.axes[0].legend(fontsize=8, loc="upper left")
    return fig


def run_events_benchmark(config: RecipeConfig) -> Path:
    out_dir = output_folder(config, "events")
    data = load_recipe_data(config.data_dir)
    users = data.users["user_id"].to_numpy()
    items = load_item_vectors(config.item_vectors_path)[0]
    events_dir = out_dir / "events"
    deploy_live_store(events_dir, config.features)
    previous = os.environ.get(EVENTS_DIR_ENV)
    os.environ[EVENTS_DIR_ENV] = str(events_dir)  # the server's events go here, not into the run's log
    try:
        with TritonServer(config.export_dir, out_dir / "triton", on_free_ports(config.serve)) as server:
            print(f"[benchmark] tritonserver pid {server.process.pid} on {server.grpc_url}", flush=True)
            load = under_load(config, server.grpc_url, users, items)
            changed = event_to_changed_answer(config, server.grpc_url, users)
    finally:
        if previous is None:
            os.environ.pop(EVENTS_DIR_ENV)
        else:
            os.environ[EVENTS_DIR_ENV] = previous
    quality = freshness(config, out_dir)
    report = {
        "date": date.today().isoformat(),
        "dataset": config.data.dataset,
        "concurrency": config.benchmark.events.concurrency,
        "event_senders": config.benchmark.events.event_senders,
        "under_load": load,
        "event_to_changed_answer": changed,
        "freshness": quality,
    }
    plot_freshness(report["freshness"]).savefig(out_dir / "freshness.png", dpi=110, bbox_inches="tight")
    _print_report(report)
    path = write_report(report, out_dir / "events.json")
    print(path)
    return path


def _print_report(report: dict) -> None:
    load = report["under_load"]
    concurrency, senders = report["concurrency"], report["event_senders"]
    rows = [(f"recommend alone, c{concurrency}", load["recommend"])]
    for name in load:
        if name.startswith("events_x"):
            rows_per_request = name.removeprefix("events_x")
            rows.append((f"recommend, c{concurrency}, with events x{rows_per_request}", load[f"recommend_with_{name}"]))
            rows.append((f"events x{rows_per_request} a request, {senders} senders", load[name]))
    print(
        "\n"
        + text_table(
            [
                Column("phase", 42),
                Column("users or events/s", 18, ",.0f"),
                Column("p50 ms", 9, ".2f"),
                Column("p99 ms", 9, ".2f"),
            ],
            [(name, result["users_per_s"], result["p50_ms"], result["p99_ms"]) for name, result in rows],
        )
    )
    changed = report["event_to_changed_answer"]
    print(
        f"\nevent OK to changed answer: p50 {changed['p50_ms']:.2f} ms, p99 {changed['p99_ms']:.2f} ms; "
        f"{changed['changed_on_first_request']} of {changed['users']} changed on the first request after the event"
    )
    print(
        "\n"
        + text_table(
            [Column("model", 16), Column("rows of the user", 34), Column("HR@10", 9), Column("NDCG@10", 9)],
            [
                (model, ARMS[arm], result[arm]["hr@10"], result[arm]["ndcg@10"])
                for model, result in report["freshness"].items()
                for arm in ARMS
            ],
        )
    )

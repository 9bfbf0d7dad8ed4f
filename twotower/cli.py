"""The two-tower recipe's commands: its stages, serving, batch top-k and benchmarks."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from twotower import pipeline
from twotower.benchmarks.harness import BenchmarkRefused
from twotower.config import ConfigError, RecipeConfig, load_config, parse_time
from twotower.console import ignore_known_warnings, quiet_library_logs, timed_step
from twotower.lifecycle.events import EventsRefused, send_events_file
from twotower.lifecycle.refresh import RefreshRefused, RolloutFailed, refresh_items
from twotower.lifecycle.retrain import RetrainRefused, retrain
from twotower.models import model_names
from twotower.serving.batch import RecommendError, run_recommend
from twotower.serving.client import demo_users, print_recommendations, typed_user_ids
from twotower.serving.triton import PortInUse, triton_server
from twotower.store.artifacts import DataError, MissingArtifact
from twotower.store.manifest import ArtifactMismatch

Handler = Callable[[RecipeConfig, argparse.Namespace], None]


@dataclass(frozen=True)
class Command:
    summary: str  # its line in `twotower --help`
    run: Handler
    loads_stack: bool = True  # False: runs without the library set-up (logging, Feast, warning filters)


def _stage(name: str) -> Handler:
    return lambda config, args: pipeline.run_stage(name, config)


def _benchmark(module: str, function: str) -> Handler:
    """A benchmark's entry point, imported only when it runs (each pulls in its own tools)."""
    return lambda config, args: getattr(importlib.import_module(f"twotower.benchmarks.{module}"), function)(config)


def _prerank(config: RecipeConfig, args: argparse.Namespace) -> None:
    with timed_step("prerank"):
        pipeline.run_prerank(config)


def _all(config: RecipeConfig, args: argparse.Namespace) -> None:
    with timed_step("all"):
        pipeline.run_all(config)
    print(f"\n{pipeline.run_summary(config)}")


def _run(config: RecipeConfig, args: argparse.Namespace) -> None:
    """Every stage, then a real Triton server answering a few users over gRPC."""
    with timed_step("all"):
        pipeline.run_all(config)
    users = demo_users(config)
    with triton_server(config) as server:
        print(f"[serve] Triton ready on grpc {server.grpc_url}; asking for users {users}")
        print_recommendations(config, users, server.grpc_url)
    print("[serve] server stopped")
    print(f"\n{pipeline.run_summary(config)}")


def _serve(config: RecipeConfig, args: argparse.Namespace) -> None:
    """Triton in the foreground until Ctrl-C, SIGTERM or SIGHUP; the server stops with this process."""
    with triton_server(config) as server:
        print(
            f"Triton serving {config.export_dir} on grpc {server.grpc_url} (http {server.ports.http}, "
            f"metrics {server.ports.metrics}); Ctrl-C stops it",
            flush=True,
        )
        try:
            server.process.wait()
        except KeyboardInterrupt:
            pass
    if server.process.returncode not in (0, -signal.SIGTERM):
        raise SystemExit(f"tritonserver exited with code {server.process.returncode}:\n{server.log_tail()}")


def _query(config: RecipeConfig, args: argparse.Namespace) -> None:
    print_recommendations(config, typed_user_ids(config, args.users))


def _recommend(config: RecipeConfig, args: argparse.Namespace) -> None:
    run_recommend(config, args.user_list, args.out)


def _events(config: RecipeConfig, args: argparse.Namespace) -> None:
    print(send_events_file(config, args.file))


def _refresh_items(config: RecipeConfig, args: argparse.Namespace) -> None:

    try:
        refresh_items(config, args.items)
    except RefreshRefused as error:  # the input or the run: exit 2, as for other usage errors
        print(f"twotower: refresh-items refused, nothing changed: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except RolloutFailed as error:
        print(f"twotower: refresh-items: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def _retrain(config: RecipeConfig, args: argparse.Namespace) -> None:

    try:
        retrain(config, parse_time(args.since, "--since"))
    except (RetrainRefused, ConfigError) as error:  # the window or the run: exit 2, as for other usage errors
        print(f"twotower: retrain refused, nothing changed: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except RolloutFailed as error:
        print(f"twotower: retrain: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def _models(config: RecipeConfig, args: argparse.Namespace) -> None:

    print("\n".join(model_names()))


COMMANDS: dict[str, Command] = {
    "data": Command("load the data set, keep positives, split users by time", _stage("data")),
    "workflow": Command("fit the NVTabular workflow on the training split", _stage("workflow")),
    "train": Command("train model.name, evaluate on the test split, save it", _stage("train")),
    "index": Command("build the FAISS index of the item vectors (index.kind)", _stage("index")),
    "features": Command("fill the Feast online store with user and item features", _stage("features")),
    "export": Command("write the Triton model repository (parts must agree)", _stage("export")),
    "all": Command("the six stages above in order, then where outputs are", _all),
    "run": Command("all, then a Triton server answering a few test users", _run),
    "prerank": Command("train serve.prerank_model as the cascade's pre-ranker", _prerank),
    "serve": Command("Triton on the exported model, in the foreground (Ctrl-C)", _serve),
    "query": Command("ask the running server for the top-k of each --user ID", _query),
    "recommend": Command("top-k of --users FILE|all into --out FILE, no server", _recommend),
    "events": Command("send the events in --file FILE to the running server", _events),
    "refresh-items": Command("add --items FILE to index and Feast; new served version", _refresh_items),
    "retrain": Command("warm start on interactions since --since TIME; roll out", _retrain),
    "models": Command("list the models that model.name accepts", _models, loads_stack=False),
    "benchmark-quality": Command(
        "popularity, EASE and two-tower setups; ablations", _benchmark("quality", "run_quality_benchmark")
    ),
    "benchmark-models": Command(
        "every model of the family, each served by Triton", _benchmark("models", "run_model_benchmark")
    ),
    "benchmark-serving": Command(
        "the served graph against the reference graph; a soak", _benchmark("serving", "run_serving_benchmark")
    ),
    "benchmark-faults": Command(
        "serving under faults: Redis down, Triton killed, soak", _benchmark("faults", "run_fault_benchmark")
    ),
    "benchmark-scale": Command(
        "index kinds on 10^4-10^6 items; Feast at 10^5-10^6 users", _benchmark("scale", "run_scale_benchmark")
    ),
    "benchmark-cold-start": Command(
        "newest items held out, refreshed in, against trained", _benchmark("cold_start", "run_cold_start_benchmark")
    ),
    "benchmark-replay": Command(
        "time replayed: incremental against full retrains", _benchmark("replay", "run_replay_benchmark")
    ),
    "benchmark-prerank": Command(
        "IntTower's ML-1M Table 2 as click-through: LR to DCN-v2", _benchmark("prerank", "run_prerank_benchmark")
    ),
    "benchmark-sequential": Command(
        "sequence towers on the public ML-1M next-item table",
        _benchmark("sequential", "run_sequential_benchmark"),
    ),
    "benchmark-events": Command(
        "live events under load; what fresh histories buy", _benchmark("events", "run_events_benchmark")
    ),
    "benchmark-train": Command(
        "training throughput against plain tf.keras; a profile", _benchmark("training", "run_train_benchmark")
    ),
}


def command_list() -> str:
    """One line per command, for the end of ``--help``."""
    width = max(map(len, COMMANDS))
    return "commands:\n" + "\n".join(f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items())


def build_parser() -> argparse.ArgumentParser:
    # One positional and options that may come before or after it, as the Makefile passes them
    # (`twotower --set k=v benchmark-serving`); subcommands would take options only after.
    parser = argparse.ArgumentParser(
        prog="twotower",
        description=__doc__,
        epilog=command_list(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="command", help="one of the commands listed below")
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="YAML file overriding the defaults in twotower/config.py"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. train.epochs=3",
    )
    parser.add_argument(
        "--user", dest="users", action="append", default=[], metavar="ID", help="user id for 'query' (repeatable)"
    )
    parser.add_argument(
        "--users",
        dest="user_list",
        metavar="FILE|all",
        help="for 'recommend': 'all', or a file of user ids (twotower/serving/batch.py)",
    )
    parser.add_argument("--out", type=Path, metavar="FILE", help="for 'recommend': the parquet file to write")
    parser.add_argument(
        "--items",
        type=Path,
        metavar="FILE",
        help="for 'refresh-items': parquet file of new items (the columns of the run's item table)",
    )
    parser.add_argument(
        "--file",
        type=Path,
        metavar="FILE",
        help="for 'events': Parquet, CSV or JSON lines with user id, item id, timestamp [, label] columns",
    )
    parser.add_argument(
        "--since",
        metavar="TIME",
        help="for 'retrain': where the new interactions begin (integer seconds or an ISO date)",
    )
    return parser


def _load_stack() -> None:
    """Logging, then the filters for the known harmless output of the pinned libraries."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import feast  # noqa: F401  (first: importing it puts its own DeprecationWarning filter in front)

    ignore_known_warnings()
    quiet_library_logs()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "query" and not args.users:
        parser.error("query needs at least one --user")
    if args.command == "recommend" and not (args.user_list and args.out):
        parser.error("recommend needs --users FILE|all and --out FILE")
    if args.command == "refresh-items" and args.items is None:
        parser.error("refresh-items needs --items FILE")
    if args.command == "events" and args.file is None:
        parser.error("events needs --file FILE")
    if args.command == "retrain" and args.since is None:
        parser.error("retrain needs --since TIME")
    command = COMMANDS[args.command]
    if command.loads_stack:
        _load_stack()
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:  # the user's input, so a message rather than a traceback
        parser.exit(2, f"twotower: configuration error: {error}\n")
    try:
        command.run(config, args)
    except (
        ArtifactMismatch,
        MissingArtifact,
        BenchmarkRefused,
        ConfigError,
        PortInUse,
        DataError,
        RecommendError,
        EventsRefused,
    ) as error:  # what the user must act on, not a crash
        parser.exit(2, f"twotower: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

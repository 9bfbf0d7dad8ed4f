"""Command-line entry point: ``twotower <stage> [--config FILE] [--set key=value ...]``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from twotower import pipeline
from twotower.client import demo_users, print_recommendations
from twotower.config import ConfigError, load_config
from twotower.manifest import ArtifactMismatch
from twotower.notebooks import ignore_known_warnings
from twotower.serve import PortInUse, triton_server

STAGES = {
    "data": pipeline.run_data,
    "workflow": pipeline.run_workflow,
    "train": pipeline.run_train,
    "index": pipeline.run_index,
    "features": pipeline.run_features,
    "export": pipeline.run_export,
    "all": pipeline.run_all,
}


def _serve(config) -> None:
    """Triton in the foreground until Ctrl-C, SIGTERM or SIGHUP; the server stops with this process."""
    with triton_server(config) as server:
        print(f"Triton serving {config.export_dir} on grpc {server.grpc_url} (http {server.ports.http}, "
              f"metrics {server.ports.metrics}); Ctrl-C stops it", flush=True)
        try:
            server.process.wait()
        except KeyboardInterrupt:
            pass
    if server.process.returncode not in (0, -signal.SIGTERM):
        raise SystemExit(f"tritonserver exited with code {server.process.returncode}:\n{server.log_tail()}")


def _query(config, users: list[int]) -> None:
    print_recommendations(config, users)


def _run(config) -> None:
    """Every stage, then a real Triton server answering a few users over gRPC."""
    pipeline.run_all(config)
    users = demo_users(config)
    with triton_server(config) as server:
        print(f"[serve] Triton ready on grpc {server.grpc_url}; asking for users {users}")
        print_recommendations(config, users, server.grpc_url)
    print("[serve] server stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twotower", description=__doc__)
    parser.add_argument(
        "stage",
        choices=[*STAGES, "run", "serve", "query", "models", "refresh-items", "benchmark-quality", "benchmark-models", "benchmark-serving", "benchmark-faults", "benchmark-scale", "benchmark-train", "benchmark-cold-start"],
        help="stage to run; 'run' is all stages plus a served demo; 'models' lists the registered models",
    )
    parser.add_argument("--config", type=Path, help="YAML file overriding the defaults in twotower/config.py")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override one setting, e.g. train.epochs=3")
    parser.add_argument("--user", dest="users", type=int, action="append", default=[], help="user id for 'query' (repeatable)")
    parser.add_argument("--items", type=Path, help="for 'refresh-items': parquet file of new items (the columns of the run's item table)")
    args = parser.parse_args(argv)
    if args.stage == "models":
        from twotower.models import model_names

        print("\n".join(model_names()))
        return 0

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import feast  # noqa: F401  (first: importing it resets the DeprecationWarning filter to "once")

    ignore_known_warnings()
    # TensorFlow's and absl's Python loggers only repeat known notes of the pinned stack
    # (moved modules, untraced functions on save, an uncompiled reload).
    from absl import logging as absl_logging

    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    absl_logging.set_verbosity(absl_logging.ERROR)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:  # the user's input, so a message rather than a traceback
        parser.exit(2, f"twotower: configuration error: {error}\n")
    try:
        if args.stage == "run":
            _run(config)
        elif args.stage == "benchmark-quality":
            from twotower.quality import run_quality_benchmark

            run_quality_benchmark(config)
        elif args.stage == "benchmark-models":
            from twotower.model_benchmark import run_model_benchmark

            run_model_benchmark(config)
        elif args.stage == "benchmark-serving":
            from twotower.serving_benchmark import run_serving_benchmark

            run_serving_benchmark(config)
        elif args.stage == "benchmark-scale":
            from twotower.scale_benchmark import run_scale_benchmark

            run_scale_benchmark(config)
        elif args.stage == "benchmark-train":
            from twotower.train_benchmark import run_train_benchmark

            run_train_benchmark(config)
        elif args.stage == "benchmark-faults":
            from twotower.fault_benchmark import run_fault_benchmark

            run_fault_benchmark(config)
        elif args.stage == "benchmark-cold-start":
            from twotower.cold_start_benchmark import run_cold_start_benchmark

            run_cold_start_benchmark(config)
        elif args.stage == "refresh-items":
            from twotower.refresh import RefreshRefused, RolloutFailed, refresh_items

            if args.items is None:
                parser.error("refresh-items needs --items FILE")
            try:
                refresh_items(config, args.items)
            except RefreshRefused as error:
                parser.exit(2, f"twotower: refresh-items refused, nothing changed: {error}\n")
            except RolloutFailed as error:
                parser.exit(1, f"twotower: refresh-items: {error}\n")
        elif args.stage == "serve":
            _serve(config)
        elif args.stage == "query":
            if not args.users:
                parser.error("query needs at least one --user")
            _query(config, args.users)
        else:
            STAGES[args.stage](config)
    except (ArtifactMismatch, PortInUse) as error:  # what the user must act on, not a crash
        parser.exit(2, f"twotower: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

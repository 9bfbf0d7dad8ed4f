"""What every benchmark shares: its output folder, runs derived from the base configuration,
servers on free ports, fixed-width tables, and the JSON report whose path it prints last."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from twotower.config import RecipeConfig, ServeConfig, set_value
from twotower.store.atomic import atomic_file


class BenchmarkRefused(RuntimeError):
    """A benchmark cannot run on this machine (a tool it needs is missing); raised before any long
    work, and printed by the command line as one line."""


def output_folder(config: RecipeConfig, benchmark: str) -> Path:
    """``<output_dir>/benchmark-<benchmark>``, created: everything the benchmark writes goes there."""
    folder = config.output_dir / f"benchmark-{benchmark}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def derived_run(base: RecipeConfig, output_dir: Path, overrides: dict[str, Any] | None = None) -> RecipeConfig:
    """A copy of ``base`` writing its run under ``output_dir`` (its Triton repository inside it),
    with each dotted setting of ``overrides`` set and checked as ``--set`` would."""
    config = copy.deepcopy(base)
    config.output_dir = output_dir
    config.export_dir = output_dir / "triton_models"
    for key, value in (overrides or {}).items():
        set_value(config, key, value)
    return config


def on_free_ports(serve: ServeConfig) -> ServeConfig:
    """``serve`` with every port picked free by the server at start, so a benchmark never measures
    a stale server on the usual ports or collides with another run."""
    return dataclasses.replace(serve, grpc_port=0, http_port=0, metrics_port=0)


@dataclasses.dataclass(frozen=True)
class Column:
    """A column of ``text_table``: its title, width and the format of its numbers."""

    title: str
    width: int
    spec: str = ".4f"


def text_table(columns: Sequence[Column], rows: Iterable[Sequence[Any]]) -> str:
    """A fixed-width table: the first column left-aligned, the others right-aligned; text is
    printed as it is, numbers with their column's format, None as '-'."""

    def cell(position: int, column: Column, value: Any) -> str:
        text = "-" if value is None else value if isinstance(value, str) else format(value, column.spec)
        return f"{text:{'<' if position == 0 else '>'}{column.width}}"

    lines = ["".join(cell(i, column, column.title) for i, column in enumerate(columns))]
    lines += ["".join(cell(i, column, value) for i, (column, value) in enumerate(zip(columns, row))) for row in rows]
    return "\n".join(lines)


def write_report(report: dict, path: Path) -> Path:
    """The benchmark's JSON report, written atomically (NumPy numbers as JSON numbers); the
    benchmark prints the returned path as its last line."""
    with atomic_file(path) as staging:
        staging.write_text(json.dumps(report, indent=2, default=float))
    return path

"""Run the notebooks headless, with parameters, the way papermill does.

The first code cell of each notebook is tagged ``parameters`` and holds its defaults
(the real ML-1M run). Values given here go into a new cell tagged
``injected-parameters`` right after it (replacing one left by an earlier run), and
the notebook runs top to bottom in a fresh kernel of this interpreter, in the
notebook's own folder, so relative paths resolve as they do in JupyterLab.

    python -m twotower.notebooks                         # all five on ML-1M, outputs written in place
    python -m twotower.notebooks -p CONFIG=../configs/synthetic.yaml --output-dir /tmp/nb
"""

from __future__ import annotations

import argparse
import ast
import logging
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
import yaml
from nbclient import NotebookClient

from twotower.config import PROJECT_ROOT
from twotower.console import ignore_known_warnings, quiet_library_logs

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
NOTEBOOKS = (
    "01_data_and_nvtabular.ipynb",
    "02_training_and_evaluation.ipynb",
    "03_embeddings.ipynb",
    "04_feature_store_and_index.ipynb",
    "05_ensemble_and_serving.ipynb",
)
PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
CELL_TIMEOUT_S = 3600


def quiet_notebook_output() -> None:
    """Hide what the stack prints that says nothing about the run: TensorFlow's C++ and Python
    log chatter and the known harmless warnings of the pinned 2023 libraries
    (``twotower.console``). Call it first in a notebook.

    TensorFlow and Feast are imported here on purpose: their import-time warnings are filtered
    here rather than in a later cell, and Feast installs warning filters of its own on import,
    so ours go in again after it.
    """
    quiet_library_logs()
    ignore_known_warnings()
    import feast  # noqa: F401  (after TensorFlow, whose import warnings its filters would show)
    import tensorflow

    # In a kernel, TensorFlow's first get_logger() sets its logger to INFO (its interactive
    # default), undoing quiet_library_logs: make that first call here, then quiet it again.
    tensorflow.get_logger().setLevel(logging.ERROR)
    ignore_known_warnings()


def _tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _parameters_cell_index(notebook) -> int:
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code" and PARAMETERS_TAG in _tags(cell):
            return index
    raise ValueError(f"no code cell tagged {PARAMETERS_TAG!r}")


def declared_parameters(notebook) -> list[str]:
    """Names the ``parameters`` cell assigns, in order."""
    tree = ast.parse(notebook.cells[_parameters_cell_index(notebook)].source)
    names = []
    for statement in tree.body:
        targets = statement.targets if isinstance(statement, ast.Assign) else [getattr(statement, "target", None)]
        names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def inject_parameters(notebook, parameters: dict[str, Any]):
    """Put ``parameters`` in a cell after the ``parameters`` cell (in place; returns the notebook).

    Only names the parameters cell declares are accepted, so a typo cannot silently
    leave a default (say, the full data set) in force.
    """
    unknown = sorted(set(parameters) - set(declared_parameters(notebook)))
    if unknown:
        raise ValueError(f"parameters {unknown} are not declared in the notebook's {PARAMETERS_TAG!r} cell")
    notebook.cells = [cell for cell in notebook.cells if INJECTED_TAG not in _tags(cell)]
    if parameters:
        source = "# Injected parameters\n" + "".join(f"{name} = {value!r}\n" for name, value in parameters.items())
        cell = nbformat.v4.new_code_cell(source, metadata={"tags": [INJECTED_TAG]})
        notebook.cells.insert(_parameters_cell_index(notebook) + 1, cell)
    return notebook


def execute_notebook(source: Path, target: Path, parameters: dict[str, Any], timeout_s: int = CELL_TIMEOUT_S):
    """Execute ``source`` with ``parameters`` and write it, outputs included, to ``target``.

    The notebook is written even when a cell fails (with the error in that cell's
    output); the error is raised afterwards.
    """
    notebook = inject_parameters(nbformat.read(source, as_version=4), parameters)
    client = NotebookClient(
        notebook,
        timeout=timeout_s,
        kernel_name="python3",  # resolved to this interpreter by jupyter_client
        resources={"metadata": {"path": str(Path(source).parent)}},
        coalesce_streams=True,  # progress bars keep only their final state
        record_timing=False,  # no timestamps in committed notebooks
    )
    try:
        client.execute()
    finally:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, target)
    return notebook


def run_notebooks(
    parameters: dict[str, Any],
    output_dir: Path | None = None,
    names: tuple[str, ...] = NOTEBOOKS,
    timeout_s: int = CELL_TIMEOUT_S,
) -> list[Path]:
    """Execute the notebooks in order, each getting the parameters it declares.

    Outputs go into the notebooks themselves, or into copies under ``output_dir``.
    """
    sources = [NOTEBOOK_DIR / name for name in names]
    declared = {source: set(declared_parameters(nbformat.read(source, as_version=4))) for source in sources}
    unknown = sorted(set(parameters) - set().union(*declared.values()))
    if unknown:
        raise ValueError(f"parameters {unknown} are declared by none of {list(names)}")
    written = []
    for source in sources:
        target = Path(output_dir) / source.name if output_dir else source
        started = time.monotonic()
        own = {name: value for name, value in parameters.items() if name in declared[source]}
        execute_notebook(source, target, own, timeout_s)
        print(f"[notebooks] {source.name}: {time.monotonic() - started:.0f} s -> {target}", flush=True)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m twotower.notebooks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "names", nargs="*", default=list(NOTEBOOKS), help="notebooks to run, in order (default: all five)"
    )
    parser.add_argument(
        "-p",
        "--parameter",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a parameter (VALUE is YAML: 3, synthetic, [a, b])",
    )
    parser.add_argument("--output-dir", type=Path, help="write executed copies here instead of updating the notebooks")
    parser.add_argument("--timeout", type=int, default=CELL_TIMEOUT_S, help="seconds one cell may run")
    args = parser.parse_args(argv)
    parameters = {}
    for item in args.parameter:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"parameter {item!r} is not of the form NAME=VALUE")
        parameters[name.strip()] = yaml.safe_load(value)
    run_notebooks(parameters, args.output_dir, tuple(args.names), args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

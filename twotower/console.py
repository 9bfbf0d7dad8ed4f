"""What the recipe's commands print: known harmless library noise filtered, stage timings,
and library chatter held back unless the step fails.

The pinned 2023 stack warns about things this recipe cannot change and that do not affect
its results. Each is filtered by its own message and category (never a whole category), so a
new warning, or the same text from another category, still shows.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator

# (category, regex matched at the start of the message), each seen in `twotower run` or the notebooks.
KNOWN_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # merlin says it once per Dataset (24 times in one run); CPU is this recipe's target.
    (UserWarning, r"Initializing an NVTabular Dataset in CPU mode"),
    # merlin probes for torch, which the recipe does not use.
    (UserWarning, r"PyTorch dtype mappings did not load"),
    # merlin-systems' Triton runtime imports NVTabular's old loader path.
    (DeprecationWarning, r"The `nvtabular.loader` module has moved"),
    # TensorFlow 2.12 imports its debugger CLI, which imports sre_constants.
    (DeprecationWarning, r"module 'sre_constants' is deprecated"),
    # faiss 1.7.4's loader compares numpy's version with distutils' LooseVersion.
    (DeprecationWarning, r"distutils Version classes are deprecated"),
    # merlin-systems' Triton runtime calls importlib.resources.path on export.
    (DeprecationWarning, r"path is deprecated\. Use files\(\) instead"),
    # matplotlib 3.8 calls pyparsing 3.2's old camelCase names and arguments ("'parseString'
    # deprecated - use 'parse_string'", "'parseAll' argument is deprecated, use 'parse_all'");
    # PyparsingDeprecationWarning is a DeprecationWarning.
    (DeprecationWarning, r"'[A-Za-z]+' (argument is )?deprecated(, | - )use '[a-z_]+'"),
    # notebook 3 shows merlin-models 23.12's catalogue helper, which it marks deprecated.
    (DeprecationWarning, r"`unique_rows_by_features` is deprecated"),
)


def ignore_known_warnings() -> None:
    """Filter the warnings of KNOWN_WARNINGS. Call it again after importing Feast: its modules
    put a filter of their own ("once" for every DeprecationWarning) in front of ours."""
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def quiet_library_logs() -> None:
    """TensorFlow's C++ and Python logs and absl's only repeat known notes of the pinned stack
    (moved modules, untraced functions on save, an uncompiled reload); faiss's INFO lines only
    say which of its builds it loaded. None of this needs TensorFlow imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # read when TensorFlow loads
    from absl import logging as absl_logging

    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


@contextlib.contextmanager
def timed_step(name: str) -> Iterator[None]:
    """Prints ``[name] done in 12.3 s`` when the step ends without an error."""
    started = time.perf_counter()
    yield
    print(f"[{name}] done in {time.perf_counter() - started:.1f} s", flush=True)


@contextlib.contextmanager
def held_back_output() -> Iterator[None]:
    """Holds back what the body prints to stdout and stderr (a library's progress bars and
    banners); shown on stderr only if the body raises, where it may explain the failure."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise

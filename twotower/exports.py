"""Public names of a subpackage, imported from their modules only when first used.

A subpackage's ``__init__`` lists what users and notebooks call (``from twotower.store import
load_split``) without importing every module behind it: ``twotower.serving`` names the graph
(merlin-systems, TensorFlow) beside the client and the Triton process, and the command line
must not pay for the first to use the second.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, modules: dict[str, list[str]]) -> tuple[list[str], Callable, Callable]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for ``package`` exporting, from each of its
    ``modules`` (names relative to the package), the listed names."""
    owner = {name: module for module, names in modules.items() for name in names}
    public = sorted(owner)

    def __getattr__(name: str):
        if name not in owner:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{owner[name]}"), name)

    def __dir__() -> list[str]:
        return public

    return public, __getattr__, __dir__

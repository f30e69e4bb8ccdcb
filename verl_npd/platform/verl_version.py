"""The version guard every verl-npd patch of verl goes through.

Each patch names the verl 0.9.1 file and line it works around and why. It is applied only to the
verl version it was written against: on any other version it is skipped with a warning, because a
silent patch of code that moved is worse than a clear failure.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
from collections.abc import Callable
from types import ModuleType

logger = logging.getLogger("verl_npd")

PATCHED_VERL_VERSION = "0.9.1"
_APPLIED: set[str] = set()


def _verl_version_matches(patch_name: str) -> bool:
    import verl

    if verl.__version__ == PATCHED_VERL_VERSION:
        return True
    logger.warning(
        "verl-npd: patch %r was written for verl %s but verl %s is installed; skipping it",
        patch_name,
        PATCHED_VERL_VERSION,
        verl.__version__,
    )
    return False


def apply_once(patch_name: str, apply: Callable[[], None]) -> None:
    """Run ``apply`` once per process, and only on the verl version the patch was written for."""
    if patch_name in _APPLIED or not _verl_version_matches(patch_name):
        return
    apply()
    _APPLIED.add(patch_name)


def apply_once_when_imported(patch_name: str, module_name: str, patch: Callable[[ModuleType], None]) -> None:
    """Run ``patch(module)`` once, right after verl's module ``module_name`` is first imported (at once
    if it already is), and only on the verl version the patch was written for.

    For patches of modules that most processes never import, or that import much: registering the
    patch imports nothing, and the patch still lands before any other module binds a patched name
    with ``from module_name import ...``, since that import is what runs it.
    """
    if module_name in sys.modules:
        apply_once(patch_name, lambda: patch(sys.modules[module_name]))
    elif not any(isinstance(finder, _PatchAfterImport) and finder.patch_name == patch_name for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport(patch_name, module_name, patch))


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of module ``module_name`` so that ``patch`` runs on it
    right after it executes, then leaves ``sys.meta_path``."""

    def __init__(self, patch_name: str, module_name: str, patch: Callable[[ModuleType], None]):
        self.patch_name = patch_name
        self.module_name = module_name
        self.patch = patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.module_name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            apply_once(self.patch_name, lambda: self.patch(module))

        spec.loader.exec_module = exec_then_patch
        return spec

"""Registers ``npd_gloo`` (:mod:`verl_npd.engines.gloo_checkpoint_engine`) with verl.

verl's checkpoint-engine registry holds classes, not class paths or loaders
(verl/checkpoint_engine/base.py:49-99), so registering means importing the engine module, whose
class registers itself with verl's decorator, as verl's own engines do
(verl/checkpoint_engine/__init__.py imports each of them). The module imports only what verl
already has loaded at that point, torch and Ray. The plugin runs this also while a fresh Ray worker
is still importing the engine module (unpickling one of its classes does, and its first verl import
runs the plugin): the import below then returns the half-initialised module, and the decorator
registers the class as soon as that module finishes.
"""

from __future__ import annotations

import importlib

ENGINE_MODULE = "verl_npd.engines.gloo_checkpoint_engine"


def register() -> None:
    """Register the ``npd_gloo`` checkpoint engine with verl. Idempotent."""
    importlib.import_module(ENGINE_MODULE)

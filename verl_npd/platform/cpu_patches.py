"""The patches verl needs on the CPU platform (:mod:`verl_npd.platform.cpu`), applied only when that
platform is the one in use: the process group and the FSDP engine lookup. (vLLM's CPU build is an
engine: :mod:`verl_npd.engines.vllm_cpu_registration`.)"""

from __future__ import annotations

import functools
import sys

from verl_npd.platform.verl_version import apply_once, apply_once_when_imported


def apply_cpu_patches() -> None:
    apply_once("gloo_only_process_group", _patch_gloo_only_process_group)
    apply_once_when_imported("fsdp_engine_on_cpu", "verl.workers.engine.base", _patch_fsdp_engine_lookup)


def _patch_gloo_only_process_group() -> None:
    """verl/utils/distributed.py:89 builds the backend ``cpu:gloo,{device}:{backend}``; with the
    device ``cpu`` that is ``cpu:gloo,cpu:gloo``, which torch rejects as a duplicate device type.
    On the CPU, gloo alone is the whole backend.

    verl/workers/engine_workers.py imports this function by name; the plugin runs at ``import
    verl``, before any worker module is imported, so they pick up the patched function.
    """
    import verl.utils.distributed as distributed

    original = distributed.initialize_global_process_group_ray

    @functools.wraps(original)
    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        return original(timeout_second=timeout_second, backend=backend or "gloo")

    distributed.initialize_global_process_group_ray = initialize_global_process_group_ray


def _patch_fsdp_engine_lookup(engine_base) -> None:
    """Let verl's FSDP engine serve the ``cpu`` device.

    verl/workers/engine/fsdp/transformer_impl.py:1143 registers the FSDP engines for the devices
    cuda and npu only, so ``EngineRegistry.get_engine_cls`` (verl/workers/engine/base.py:399)
    finds none for ``cpu``. The FSDP2 engine itself is device-agnostic (it asks the platform), so
    on the CPU we look up the cuda registration instead. That is done at lookup time rather than by
    registering for ``cpu`` here, because importing the FSDP engine module costs seconds and most
    processes that import verl never build an engine (nor import ``engine/base.py``, when the patch
    is applied).

    When the FSDP engine is handed out, its module's ``CPUOffloadPolicy`` is replaced by one that
    never pins memory: transformer_impl.py:462 hard-codes ``CPUOffloadPolicy(pin_memory=True)``,
    and pinning needs an accelerator.
    """
    EngineRegistry = engine_base.EngineRegistry
    original = EngineRegistry.get_engine_cls.__func__

    def get_engine_cls(cls, model_type: str, backend: str):
        from verl.utils.device import get_device_name

        if get_device_name() != "cpu" or "cpu" in cls._engines.get(model_type, {}).get(backend, {}):
            return original(cls, model_type, backend)
        engine_cls = cls._engines[model_type][backend].get("cuda")
        if engine_cls is None:
            raise ValueError(
                f"verl-npd: the {backend!r} engine has no CPU support; on a CPU-only machine use "
                "strategy=fsdp2 (FSDP1 refuses CPU parameters)"
            )
        _unpin_cpu_offload(sys.modules[engine_cls.__module__])
        return engine_cls

    EngineRegistry.get_engine_cls = classmethod(get_engine_cls)


def _unpin_cpu_offload(engine_module) -> None:
    offload_policy_cls = getattr(engine_module, "CPUOffloadPolicy", None)
    if offload_policy_cls is None or getattr(offload_policy_cls, "_verl_npd_unpinned", False):
        return

    class UnpinnedCPUOffloadPolicy(offload_policy_cls):
        _verl_npd_unpinned = True

        def __init__(self, pin_memory: bool = False):
            super().__init__(pin_memory=False)

    engine_module.CPUOffloadPolicy = UnpinnedCPUOffloadPolicy

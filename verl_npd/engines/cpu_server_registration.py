"""Registers ``npd_cpu`` (:mod:`verl_npd.engines.cpu_server`) with verl, without importing it.

The plugin runs this in every process at ``import verl``, also while a fresh Ray worker is still
importing ``cpu_server`` itself (unpickling ``CPURolloutServer`` imports it, and its first verl
import runs the plugin). So nothing here imports ``cpu_server``: verl's rollout registries take a
loader and a class path, and verl resolves them only when it builds an ``npd_cpu`` replica.
"""

from __future__ import annotations

from verl_npd.platform.verl_version import apply_once_when_imported

ROLLOUT_NAME = "npd_cpu"
SERVER_MODULE = "verl_npd.engines.cpu_server"


def _load_replica_class():
    from verl_npd.engines.cpu_server import CPURolloutReplica

    return CPURolloutReplica


def _patch_teacher_topk_check(distillation_config) -> None:
    """Let an ``npd_cpu`` teacher return top-k prompt log-probs.

    verl/workers/config/distillation.py:188 (``DistillationTeacherModelConfig._validate_topk_logprobs``,
    the raise at :215-218) rejects every teacher engine but vllm and sglang when the distillation
    loss uses top-k, because vLLM needs an engine-wide ``max_logprobs``. Like SGLang, ``npd_cpu``
    takes the top-k per request, so for it only the "topk must be set" part of the check applies;
    every other engine keeps verl's check.
    """
    DistillationTeacherModelConfig = distillation_config.DistillationTeacherModelConfig
    original = DistillationTeacherModelConfig._validate_topk_logprobs

    def _validate_topk_logprobs(self, use_topk: bool, topk):
        if self.inference.name != ROLLOUT_NAME:
            return original(self, use_topk=use_topk, topk=topk)
        if use_topk and topk is None:
            raise ValueError("topk must be specified when use_topk is True.")

    DistillationTeacherModelConfig._validate_topk_logprobs = _validate_topk_logprobs


def register() -> None:
    """Register ``npd_cpu`` with verl's rollout registries. Idempotent."""
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica_class)
    # verl 0.9.1 has no register function for the in-worker adapter: get_rollout_class reads this
    # module-level dict of class paths (verl/workers/rollout/base.py:89-93, read at :96-109).
    _ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = f"{SERVER_MODULE}.CPUServerAdapter"
    apply_once_when_imported("teacher_topk_engines", "verl.workers.config.distillation", _patch_teacher_topk_check)

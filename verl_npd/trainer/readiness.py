"""``python -m verl_npd.main_npd <config and overrides> --check [--gpu-memory-gib N]``: can this run
start? It runs every check of the preflight (:mod:`verl_npd.trainer.preflight`), lists every problem
instead of stopping at the first, and prints the resource plan: the GPUs of each pool, the replicas
they hold, and each process's memory share against what its model needs
(:mod:`verl_npd.trainer.memory`). Nothing starts. Exit code 0 when nothing stops the run from
starting, 2 otherwise.

On a machine without the run's GPUs (planning a GPU run on a laptop), ``--gpu-memory-gib`` gives the
memory of one GPU; the GPU count is still this machine's, so the check says the run cannot start here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from verl_npd.platform.gpu_stack import use_sdpa_without_flash_attn
from verl_npd.trainer.memory import (
    GIB,
    gpu_memory_here,
    memory_needs,
    resident_beside_trainer,
    size_text,
    student_replica_share,
)
from verl_npd.trainer.preflight import PreflightError, plan_resources, preflight, served_teacher_url, size_problems

CHECK_FLAG = "--check"
GPU_MEMORY_FLAG = "--gpu-memory-gib"


@dataclass(frozen=True)
class CheckRequest:
    gpu_memory_gib: float | None


def split_check_flags(argv: list[str]) -> tuple[list[str], CheckRequest | None]:
    """Take ``--check`` and ``--gpu-memory-gib N`` (or ``=N``) out of ``argv`` (the rest is Hydra's);
    the request, or None without ``--check``. Raises ValueError naming the flag when it is misused."""
    rest, check, memory = [], False, None
    args = iter(argv)
    for arg in args:
        if arg == CHECK_FLAG:
            check = True
        elif arg == GPU_MEMORY_FLAG or arg.startswith(GPU_MEMORY_FLAG + "="):
            value = arg.partition("=")[2] if "=" in arg else next(args, None)
            try:
                memory = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{GPU_MEMORY_FLAG} takes one GPU's memory in GiB, e.g. {GPU_MEMORY_FLAG} 80") from None
            if memory <= 0:
                raise ValueError(f"{GPU_MEMORY_FLAG} must be > 0, got {value}")
        else:
            rest.append(arg)
    if memory is not None and not check:
        raise ValueError(f"{GPU_MEMORY_FLAG} is for {CHECK_FLAG} (the readiness check)")
    return rest, CheckRequest(memory) if check else None


def check_readiness(config: DictConfig, gpu_memory_gib: float | None, out=None) -> int:
    """Print the plan, the notes and every problem; 0 when none stops the run, else 2."""
    from verl.utils.device import auto_set_device

    out = out or sys.stdout
    auto_set_device(config)
    notes = [note for note in [use_sdpa_without_flash_attn(config)] if note]
    gpu_memory, source = None, ""
    if gpu_memory_gib is not None:
        gpu_memory, source = int(gpu_memory_gib * GIB), GPU_MEMORY_FLAG
    elif config.trainer.device != "cpu":
        gpu_memory, source = gpu_memory_here(), "this machine's first GPU"
        if gpu_memory is None:
            notes.append(f"no GPU here to read the memory of: give {GPU_MEMORY_FLAG} to estimate what fits")
    try:
        problems = preflight(config, gpu_memory_bytes=gpu_memory, collect=True).problems
    except PreflightError as e:  # the config is not an NPD config at all
        problems = [str(e)]
    print("verl-npd readiness check (nothing is started)", file=out)
    # The plan and the memory estimate are arithmetic on the sizes, named among the problems when wrong.
    sized = not size_problems(config)
    plan = plan_lines(config) if sized else ["no resource plan until the sizes named below are right"]
    for line in plan:
        print(f"  {line}", file=out)
    if gpu_memory is not None and "npd" in config and sized:
        print(f"memory, per GPU of {size_text(gpu_memory)} ({source}):", file=out)
        needs, unknown = memory_needs(config, gpu_memory)
        for need in needs:
            print(f"  {'ok ' if need.fits else 'NO '} {need.line()}", file=out)
        notes += [f"not estimated: {what}" for what in unknown]
    for note in notes:
        print(f"note: {note}", file=out)
    for problem in problems:
        print(f"problem: {problem}", file=out)
    if problems:
        print(f"verl-npd: not ready: {len(problems)} problem(s) above", file=out)
        return 2
    print("verl-npd: ready: nothing found that stops this run from starting", file=out)
    return 0


def plan_lines(config: DictConfig) -> list[str]:
    """The resource plan: each pool's GPUs and what runs on them."""
    try:
        pools = plan_resources(config)
    except PreflightError as e:
        return [f"no resource plan: {e}"]
    rollout = config.actor_rollout_ref.rollout
    trainer_gpus = pools["trainer"]
    data_parallel = trainer_gpus // config.actor_rollout_ref.actor.get("ulysses_sequence_parallel_size", 1)
    samples = config.data.train_batch_size * rollout.n
    engine = f"{rollout.name}, TP {rollout.tensor_model_parallel_size}"
    lines = [
        f"trainer: {trainer_gpus} GPU(s) (trainer.n_gpus_per_node={config.trainer.n_gpus_per_node} x "
        f"trainer.nnodes={config.trainer.nnodes}): {trainer_gpus} FSDP2 rank(s), {samples // data_parallel} "
        f"samples each per step"
    ]
    colocated = trainer_gpus // rollout.tensor_model_parallel_size
    gpu = config.trainer.device != "cpu"  # memory shares mean nothing to the CPU engines

    def share_of(share, key: str) -> str:
        return f", memory share {share} ({key})" if gpu else ""

    share, share_key = student_replica_share(rollout)
    if rollout.nnodes > 0:
        standalone = pools["standalone rollout"]
        lines.append(
            f"standalone rollout: {standalone} GPU(s) (actor_rollout_ref.rollout.n_gpus_per_node="
            f"{rollout.n_gpus_per_node} x nnodes={rollout.nnodes}): "
            f"{standalone // rollout.tensor_model_parallel_size} student replica(s) ({engine})"
            f"{share_of(share, share_key)}, synced through {rollout.checkpoint_engine.backend}"
        )
        sleep = "asleep between validations" if rollout.free_cache_engine else "resident (free_cache_engine=false)"
        lines.append(
            f"validation: {colocated} student replica(s) on the trainer's GPUs (verl 0.9.1 builds them)"
            f"{share_of(rollout.gpu_memory_utilization, 'actor_rollout_ref.rollout.gpu_memory_utilization')}, {sleep}"
        )
    else:
        lines.append(
            f"student rollout: {colocated} replica(s) ({engine}) on the trainer's GPUs"
            f"{share_of(share, share_key)}, resident while the trainer trains"
        )
    url = served_teacher_url(config)
    if url:
        held = OmegaConf.select(config, "npd.teacher.gpu_memory_share") or 0.0
        where = f"on the trainer's GPUs, memory share {held} (npd.teacher.gpu_memory_share)" if held else "elsewhere"
        lines.append(f"teacher: served at {url}, {where}; no GPU of this job")
    elif config.distillation.enabled:
        lines += teacher_lines(config, pools["teacher"], gpu)
    resident = resident_beside_trainer(config)
    if resident and gpu:
        lines.append("beside each trainer rank while it trains: " + ", ".join(f"{w} {s}" for w, s in resident))
    lines.append(f"total: {sum(pools.values())} GPU(s)")
    return lines


def teacher_lines(config: DictConfig, pool_gpus: int, gpu: bool) -> list[str]:
    from verl.utils.config import omega_conf_to_dataclass

    distillation = config.distillation
    lines = [
        f"teacher: {pool_gpus} GPU(s) (distillation.n_gpus_per_node={distillation.n_gpus_per_node} x "
        f"distillation.nnodes={distillation.nnodes})"
    ]
    teachers = omega_conf_to_dataclass(distillation).teacher_models
    for key, teacher in teachers.items():
        inference = teacher.inference
        share = f", memory share {inference.gpu_memory_utilization}" if gpu else ""
        lines.append(
            f"  {key}: {teacher.num_replicas} replica(s) ({inference.name}, TP {inference.tensor_model_parallel_size}){share}"
        )
    return lines

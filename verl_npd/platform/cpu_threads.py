"""How many torch threads each process of a CPU run takes.

On a CPU node the trainer ranks, the student's rollout servers and the teacher's servers all compute
on the same cores. torch gives every process as many threads as the machine has cores, so three
busy processes on two cores run six threads, and OpenMP's default spin-waiting burns the cores
that the others need (generating 64 prompts took 6.5 s beside one busy process, 0.08 s with one
thread each). So every process takes its share of the node's cores, and OpenMP threads sleep
instead of spinning while they wait.

The setting is the environment variable ``VERL_NPD_CPU_THREADS`` (threads per process). Ray workers
inherit the driver's environment, and the CPU platform applies it in every process that imports
verl, whichever entry point started the run (``main_npd``, verl's ``main_ppo``, the benchmark).
``main_npd`` sets it, when unset, to the node's cores divided by the processes its config puts on a
node (:func:`compute_processes_per_node`).
"""

from __future__ import annotations

import os

from omegaconf import DictConfig

THREADS_ENV = "VERL_NPD_CPU_THREADS"
# libgomp reads it when it loads, so it must be in the environment before a worker imports torch.
OMP_WAIT_POLICY_ENV = "OMP_WAIT_POLICY"


def node_cores() -> int:
    return len(os.sched_getaffinity(0))


def configured_threads() -> int | None:
    """Threads per process from ``VERL_NPD_CPU_THREADS``, or None when it is unset."""
    value = os.environ.get(THREADS_ENV)
    if not value:
        return None
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"{THREADS_ENV} must be a positive number of threads, got {value!r}")
    return threads


def compute_processes_per_node(config: DictConfig) -> int:
    """Processes that compute on one node: trainer ranks, rollout servers (colocated and standalone)
    and teacher servers (in the job). Counted as if every pool shared the node, which is exact on one machine
    and conservative on several."""
    rollout = config.actor_rollout_ref.rollout
    rollout_tp = max(1, int(rollout.get("tensor_model_parallel_size", 1) or 1))
    trainer_ranks = int(config.trainer.n_gpus_per_node)
    processes = trainer_ranks + max(1, trainer_ranks // rollout_tp)
    if int(rollout.get("nnodes", 0) or 0) > 0:
        processes += max(1, int(rollout.n_gpus_per_node) // rollout_tp)
    distillation = config.get("distillation")
    served_teacher = config.get("npd", {}).get("teacher", {}).get("url")
    if distillation is not None and distillation.get("enabled", False) and not served_teacher:
        # One server process per teacher replica, whatever its tensor parallelism (none for a
        # teacher served outside the job, npd.teacher.url).
        processes += sum(int(teacher.get("num_replicas", 1) or 1) for teacher in distillation.teacher_models.values())
    return processes


def share_cores(config: DictConfig) -> None:
    """Before Ray starts (on the CPU platform): give every process its share of the node's cores
    unless ``VERL_NPD_CPU_THREADS`` says otherwise, and make waiting OpenMP threads sleep."""
    os.environ.setdefault(OMP_WAIT_POLICY_ENV, "PASSIVE")
    if configured_threads() is None:
        os.environ[THREADS_ENV] = str(max(1, node_cores() // compute_processes_per_node(config)))
    apply_configured_threads()


def apply_configured_threads() -> None:
    """Set this process's torch threads from ``VERL_NPD_CPU_THREADS`` (nothing when it is unset)."""
    threads = configured_threads()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)

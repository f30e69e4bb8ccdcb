"""The compared methods and the command line that runs each one as its own process.

Every method gets the same models, prompts, batch, lr, token budget, number of optimizer steps and
validation set/frequency: NPD's and verl's runs through the recipe's configs plus the same scale
overrides, SFT through the settings read from the NPD config (``sft_command``). Only the overrides
listed in ``METHODS`` differ; nothing is tuned per method.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field

from omegaconf import DictConfig

from verl_npd.bench.settings import Recipe, Scale


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    # Which entry point runs it: "npd" (python -m verl_npd.main_npd), "verl" (verl's
    # python -m verl.trainer.main_ppo) or "sft" (verl's SFT trainer, verl_npd.bench.sft_trainer).
    runner: str
    overrides: tuple[str, ...] = ()
    # Runs verl's v1 trainer (gets the recipe's v1_overrides).
    v1: bool = False
    # The teacher is served by ``python -m verl_npd.serve`` (started and stopped by the benchmark,
    # ``served_teacher_command``) and the job scores through ``npd.teacher.url`` instead of a verl
    # teacher replica of its own (toy only).
    served_teacher: bool = False


METHODS = (
    Method("npd", "NPD (default)", "npd"),
    # The recipe's baseline as it is: verl's synchronous loop (toy: legacy trainer; GPU: v1 sync).
    Method("opd", "verl OPD (sync)", "verl"),
    # verl's built-in asynchronous OPD: the v1 trainer's colocate_async mode (rollout colocated with
    # the trainer, partial rollouts carried across weight syncs, bounded by verl's default
    # trainer.v1.sampler.max_off_policy_threshold).
    Method(
        "opd_async",
        "verl OPD (colocate_async)",
        "verl",
        ("trainer.use_v1=true", "trainer.v1.trainer_mode=colocate_async"),
        v1=True,
    ),
    Method("sft", "SFT on teacher responses", "sft"),
    Method("npd_no_filter", "NPD, no Δ-IFD filter", "npd", ("npd.filter.enabled=false",)),
    Method("npd_sync1", "NPD, sync every step", "npd", ("npd.sync_interval=1",)),
    # The staleness bound before generation ran across syncs: what the extra staleness costs.
    Method("npd_staleness1", "NPD, max staleness 1", "npd", ("npd.buffer.max_staleness=1",)),
    # What the decoupled teacher costs or saves: the same teacher behind an HTTP server, outside the
    # job (which then reserves no logical GPU for it).
    Method(
        "npd_remote_teacher",
        "NPD, teacher served over HTTP",
        "npd",
        ("ray_kwargs.ray_init.num_gpus=1",),
        served_teacher=True,
    ),
)
METHOD_NAMES = tuple(m.name for m in METHODS)
# What the reference run compares (the goals: NPD against verl's sync OPD and SFT). The
# other three stay available; with three seeds they do not fit the reference run's time on 2 cores.
DEFAULT_METHODS = ("npd", "opd", "sft")


def select_methods(names: list[str]) -> list[Method]:
    by_name = {m.name: m for m in METHODS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHOD_NAMES)}")
    return [by_name[n] for n in names]


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    # The file with one JSON line per trained step (for the progress bar and the readers).
    steps_file: str = ""


def run_overrides(runner: str, scale: Scale, val_files: str | None, seed: int) -> list[str]:
    """The same run size and seed for NPD and verl runs (NPD counts its steps in npd.total_steps;
    verl's trainer.total_training_steps follows it in the NPD config).

    What a seed varies: ``data.seed`` is the order of the training prompts (NPD: the permutation of
    its prompt stream, and each sample's own sampling seed; verl: its dataloader's RandomSampler).
    ``actor_rollout_ref.rollout.seed`` seeds the ``npd_cpu`` server's generator, which draws the
    tokens of every request that carries no seed of its own: verl's agent loop sends none, so it is
    OPD's sampling noise; NPD's requests all carry their own, so it changes nothing there and is
    set only so that every method gets the same overrides. The student is loaded, not initialised,
    so nothing else is random.
    """
    overrides = ["trainer.val_before_train=true", f"data.seed={seed}", f"actor_rollout_ref.rollout.seed={seed}"]
    if scale.steps is not None:
        steps_key = "npd.total_steps" if runner == "npd" else "trainer.total_training_steps"
        overrides.append(f"{steps_key}={scale.steps}")
    if scale.train_batch_size is not None:
        overrides.append(f"data.train_batch_size={scale.train_batch_size}")
    if scale.test_freq is not None:
        overrides.append(f"trainer.test_freq={scale.test_freq}")
    if val_files is not None:
        overrides.append(f"data.val_files={val_files}")
    return overrides


def method_command(
    method: Method,
    recipe: Recipe,
    scale: Scale,
    val_files: str | None,
    seed: int,
    run_dir: str,
    teacher_url: str | None = None,
) -> Command:
    """The command of an NPD or verl method with one seed; its outputs all go under ``run_dir``.
    ``teacher_url``: where the served teacher of a ``served_teacher`` method answers."""
    if method.served_teacher != (teacher_url is not None):
        raise ValueError(f"{method.name}: a teacher URL goes with served_teacher methods only, got {teacher_url!r}")
    served = [f"npd.teacher.url={teacher_url}", f"npd.teacher.model={SERVED_TEACHER_NAME}"] if teacher_url else []
    common = [
        f"trainer.default_local_dir={run_dir}/checkpoints",
        "trainer.save_freq=-1",
        f"hydra.run.dir={run_dir}/hydra",
        *run_overrides(method.runner, scale, val_files, seed),
    ]
    if method.runner == "npd":
        argv = [
            sys.executable, "-m", "verl_npd.main_npd",
            "--config-path", recipe.npd_config_dir, "--config-name", recipe.npd_config_name,
            *common,
            f"npd.output_dir={run_dir}",
            # NPD writes its own metrics.jsonl and summary.json.
            "trainer.logger=[console]",
            *method.overrides,
            *served,
        ]  # fmt: skip
        return Command(argv, steps_file=os.path.join(run_dir, "metrics.jsonl"))
    if method.runner == "verl":
        metrics_file = os.path.join(run_dir, "metrics.jsonl")
        argv = [
            sys.executable, "-m", "verl.trainer.main_ppo",
            "--config-path", recipe.opd_config_dir, "--config-name", recipe.opd_config_name,
            *common,
            # verl's own tracking, file backend: one JSON line per step at $VERL_FILE_LOGGER_PATH.
            "trainer.logger=[console,file]",
            *method.overrides,
            *(recipe.v1_overrides if method.v1 else ()),
        ]  # fmt: skip
        return Command(argv, env={"VERL_FILE_LOGGER_PATH": metrics_file}, steps_file=metrics_file)
    raise ValueError(f"{method.name}: use sft_command for runner {method.runner!r}")


# The name the benchmark's served teacher answers to (npd.teacher.model).
SERVED_TEACHER_NAME = "teacher"


def served_teacher_command(teacher_dir: str, port: int) -> Command:
    """``python -m verl_npd.serve`` on loopback: the teacher of a ``served_teacher`` method. It
    inherits the environment, so the ``VERL_NPD_CPU_THREADS`` the benchmark sets for every method
    (the share of a teacher replica) is its thread count too."""
    argv = [
        sys.executable, "-m", "verl_npd.serve", teacher_dir,
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_TEACHER_NAME,
    ]  # fmt: skip
    return Command(argv)


def sft_command(npd_config: DictConfig, responses_parquet: str, run_dir: str) -> Command:
    """verl's SFT trainer on the teacher's responses, with the NPD config's student, batch, optimiser,
    precision and token budget (``npd_config`` composed with the benchmark's run overrides). verl
    0.9.1's SFT trainer reads no seed (its sampler shuffles with a fixed one, and the student is
    loaded, not initialised): a seed varies SFT through the prompts of ``responses_parquet``.

    A checkpoint is saved at every validation step of the other methods (``trainer.test_freq``);
    the benchmark evaluates them afterwards with the same greedy exact-match as their validation.
    """
    actor = npd_config.actor_rollout_ref.actor
    model = npd_config.actor_rollout_ref.model
    optim = actor.optim
    budget = actor.ppo_max_token_len_per_gpu
    precision = ",".join(f"{k}:{v}" for k, v in actor.fsdp_config.mixed_precision.items())
    timeline = os.path.join(run_dir, "timeline.jsonl")
    argv = [
        sys.executable, "-m", "verl_npd.bench.sft_trainer",
        f"data.train_files={responses_parquet}",
        "data.val_files=null",
        f"data.train_batch_size={npd_config.data.train_batch_size}",
        f"data.max_token_len_per_gpu={budget}",
        f"data.max_length={budget}",
        "data.num_workers=0",
        f"model.path={model.path}",
        f"model.use_remove_padding={model.use_remove_padding}",
        *(f"+model.override_config.{k}={v}" for k, v in model.override_config.items()),
        f"engine.strategy={actor.strategy}",
        f"+engine.mixed_precision={{{precision}}}",
        f"optim.lr={optim.lr}",
        f"optim.weight_decay={optim.weight_decay}",
        f"optim.lr_warmup_steps_ratio={optim.lr_warmup_steps_ratio}",
        f"optim.clip_grad={optim.clip_grad}",
        f"optim.betas=[{','.join(str(b) for b in optim.betas)}]",
        f"trainer.device={npd_config.trainer.device}",
        f"trainer.total_training_steps={npd_config.npd.total_steps}",
        # The responses file holds exactly total_steps batches.
        "trainer.total_epochs=1",
        f"trainer.save_freq={npd_config.trainer.test_freq}",
        "trainer.test_freq=-1",
        f"trainer.default_local_dir={run_dir}/checkpoints",
        "trainer.resume_mode=disable",
        "trainer.logger=[console]",
        "checkpoint.save_contents=[hf_model]",
        f"+timeline_path={timeline}",
        f"hydra.run.dir={run_dir}/hydra",
    ]  # fmt: skip
    # One process, rank 0 of 1 (sft_trainer.py sets up the gloo group from these).
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(free_port())
    return Command(argv, env=env, steps_file=timeline)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

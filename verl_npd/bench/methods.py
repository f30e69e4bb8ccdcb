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
from verl_npd.platform.cpu_threads import THREADS_ENV


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    # Which entry point runs it: "npd" (python -m verl_npd.main_npd), "verl" (one of verl's trainers,
    # ``module``) or "sft" (verl's SFT trainer, verl_npd.bench.sft_trainer).
    runner: str
    overrides: tuple[str, ...] = ()
    # verl runs: the config in the recipe's OPD folder the run starts from, and verl's entry point.
    opd_config: str = "opd_baseline"
    module: str = "verl.trainer.main_ppo"
    # The teacher is served by ``python -m verl_npd.serve`` (started and stopped by the benchmark,
    # ``served_teacher_command``) and the job scores through ``npd.teacher.url`` instead of a verl
    # teacher replica of its own (toy only).
    served_teacher: bool = False
    # One of verl's own on-policy distillation modes: NPD's goals are stated against the best of them.
    opd_mode: bool = False
    # How the method's trainer counts a run's size: "steps", optimizer steps in
    # trainer.total_training_steps, prompts per step in data.train_batch_size; "sync_groups" (verl's
    # separate_async), a step is ``updates_per_step`` optimizer updates of
    # actor.ppo_mini_batch_size prompts and one weight sync (data.train_batch_size holds them all);
    # "rollout_prompts" (verl's fully_async), the rollouter's prompt budget
    # (rollout.total_rollout_steps) ends the run, trainer.total_training_steps only shapes the
    # learning-rate schedule, and a logged step is one weight sync of ``updates_per_step`` updates.
    sizing: str = "steps"
    # Optimizer updates per step as verl logs it (and counts trainer.test_freq in).
    updates_per_step: int = 1
    # The teacher is the toy's second one, with a tokenizer of its own (verl_npd/toy/cross.py;
    # ``CROSS_TEACHER_OVERRIDES``; toy only): NPD scores across tokenizers, SFT trains on its text.
    cross_teacher: bool = False


# The toy's second teacher in place of the first, for NPD and for SFT (which reads the teacher from
# the NPD config).
CROSS_TEACHER_OVERRIDES = ("distillation.teacher_models.teacher_model.model_path=${npd_toy_cross:teacher_dir}",)


METHODS = (
    Method("npd", "NPD (default)", "npd"),
    # verl's synchronous loop (toy: the legacy trainer, the faster one for tiny runs; GPU recipes: the
    # v1 sync mode), old-log-prob pass bypassed (topk_distillation.yaml).
    Method("opd", "verl OPD, sync", "verl", opd_mode=True),
    # verl's v1 asynchronous trainer with a standalone rollout pool: the rollout never stops for the
    # update, weights go over a checkpoint engine every parameter_sync_step.
    # Its config's trainer.v1.separate_async.parameter_sync_step is updates_per_step.
    Method(
        "opd_separate_async",
        "verl OPD, separate_async",
        "verl",
        opd_config="opd_separate_async",
        opd_mode=True,
        sizing="sync_groups",
        updates_per_step=2,
    ),
    # verl's experimental fully asynchronous trainer (rollouter and trainer as separate Ray actors,
    # bounded staleness, partial rollouts); its config's async_training.trigger_parameter_sync_step is
    # updates_per_step.
    Method(
        "opd_fully_async",
        "verl OPD, fully_async",
        "verl",
        opd_config="opd_fully_async",
        module="verl.experimental.fully_async_policy.fully_async_main",
        opd_mode=True,
        sizing="rollout_prompts",
        updates_per_step=2,
    ),
    # verl's v1 trainer's colocate_async mode (rollout colocated with the trainer, partial rollouts
    # carried across weight syncs, verl's default trainer.v1.sampler.max_off_policy_threshold).
    Method(
        "opd_colocate_async",
        "verl OPD, colocate_async",
        "verl",
        ("trainer.use_v1=true", "trainer.v1.trainer_mode=colocate_async"),
        opd_mode=True,
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
    # Across tokenizers: the toy's second teacher (another family, digit pairs as tokens, its own chat
    # template), against NPD from the toy teacher and SFT on the second teacher's text.
    Method(
        "npd_cross_tokenizer",
        "NPD across tokenizers",
        "npd",
        ("npd.cross_tokenizer.enabled=true",),
        cross_teacher=True,
    ),
    Method("sft_cross_tokenizer", "SFT on the cross-tokenizer teacher's responses", "sft", cross_teacher=True),
)
METHOD_NAMES = tuple(m.name for m in METHODS)
# What the reference run compares (the goals): NPD against verl's sync and asynchronous OPD
# modes and SFT. The others stay available with --methods.
DEFAULT_METHODS = ("npd", "opd", "opd_separate_async", "opd_fully_async", "sft")


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


def run_overrides(
    scale: Scale,
    val_files: str | None,
    seed: int,
    validate: bool = True,
    method: Method = METHODS[0],
    prompts_per_step: int | None = None,
) -> list[str]:
    """The same run size and seed for every method: N optimizer steps of B prompts, validated every
    V optimizer steps, in each trainer's own terms (``size_overrides``).

    What a seed varies: ``data.seed`` is the order of the training prompts (NPD: the permutation of
    its prompt stream, and each sample's own sampling seed; verl: its dataloader's RandomSampler).
    ``actor_rollout_ref.rollout.seed`` seeds the ``npd_cpu`` server's generator, which draws the
    tokens of every request that carries no seed of its own: verl's agent loop sends none, so it is
    OPD's sampling noise; NPD's requests all carry their own, so it changes nothing there and is
    set only so that every method gets the same overrides. The student is loaded, not initialised,
    so nothing else is random. ``validate=False`` (the thread trials): no validation at all.
    """
    overrides = [f"data.seed={seed}", f"actor_rollout_ref.rollout.seed={seed}"]
    overrides += ["trainer.val_before_train=true"] if validate else ["trainer.val_before_train=false", "trainer.test_freq=-1"]
    overrides += size_overrides(method, scale, validate, prompts_per_step)
    if val_files is not None:
        overrides.append(f"data.val_files={val_files}")
    return overrides


def size_overrides(method: Method, scale: Scale, validate: bool, prompts_per_step: int | None) -> list[str]:
    """N optimizer steps (``scale.steps``) of B prompts (``scale.train_batch_size``, else
    ``prompts_per_step``) validated every V optimizer steps, in the keys ``method.sizing`` says its
    trainer counts them in (None in ``scale``: the recipe's own)."""
    k = method.updates_per_step

    def in_verl_steps(what: str, n: int) -> int:
        if n % k:
            raise ValueError(f"{method.name} counts {k} optimizer steps per step: {what} {n} is not a multiple of {k}")
        return n // k

    steps, batch = scale.steps, scale.train_batch_size
    overrides = []
    if scale.test_freq is not None and validate:
        overrides.append(f"trainer.test_freq={in_verl_steps('the validation interval', scale.test_freq)}")
    if method.sizing == "steps":
        overrides += [] if steps is None else [f"trainer.total_training_steps={steps}"]
        overrides += [] if batch is None else [f"data.train_batch_size={batch}"]
    elif method.sizing == "sync_groups":
        overrides += [] if steps is None else [f"trainer.total_training_steps={in_verl_steps('the step count', steps)}"]
        overrides += [] if batch is None else [f"data.train_batch_size={k * batch}", f"actor_rollout_ref.actor.ppo_mini_batch_size={batch}"]
    elif method.sizing == "rollout_prompts":
        batch = batch or prompts_per_step
        if steps is not None:
            if batch is None:
                raise ValueError(f"{method.name}: its prompt budget needs the prompts per step")
            overrides += [f"rollout.total_rollout_steps={steps * batch}", f"trainer.total_training_steps={steps}"]
        overrides += [] if scale.train_batch_size is None else [f"actor_rollout_ref.actor.ppo_mini_batch_size={batch}"]
    else:
        raise ValueError(f"{method.name}: unknown sizing {method.sizing!r}")
    return overrides


def method_command(
    method: Method,
    recipe: Recipe,
    scale: Scale,
    val_files: str | None,
    seed: int,
    run_dir: str,
    teacher_url: str | None = None,
    threads: int | None = None,
    validate: bool = True,
    prompts_per_step: int | None = None,
) -> Command:
    """The command of an NPD or verl method with one seed; its outputs all go under ``run_dir``.
    ``teacher_url``: where the served teacher of a ``served_teacher`` method answers. ``threads``:
    torch threads of each of its processes (``VERL_NPD_CPU_THREADS``; None: the default share).
    ``prompts_per_step``: the recipe's, for a trainer that counts its size in prompts."""
    if method.served_teacher != (teacher_url is not None):
        raise ValueError(f"{method.name}: a teacher URL goes with served_teacher methods only, got {teacher_url!r}")
    served = [f"npd.teacher.url={teacher_url}", f"npd.teacher.model={SERVED_TEACHER_NAME}"] if teacher_url else []
    env = thread_env(threads)
    common = [
        f"trainer.default_local_dir={run_dir}/checkpoints",
        "trainer.save_freq=-1",
        f"hydra.run.dir={run_dir}/hydra",
        *run_overrides(scale, val_files, seed, validate, method, prompts_per_step),
    ]
    if method.runner == "npd":
        argv = [
            sys.executable, "-m", "verl_npd.main_npd",
            "--config-path", recipe.npd_config_dir, "--config-name", recipe.npd_config_name,
            *common,
            f"npd.output_dir={run_dir}",
            # NPD writes its own metrics.jsonl and summary.json.
            "trainer.logger=[console]",
            *(CROSS_TEACHER_OVERRIDES if method.cross_teacher else ()),
            *method.overrides,
            *served,
        ]  # fmt: skip
        return Command(argv, env=env, steps_file=os.path.join(run_dir, "metrics.jsonl"))
    if method.runner == "verl":
        metrics_file = os.path.join(run_dir, "metrics.jsonl")
        argv = [
            sys.executable, "-m", method.module,
            "--config-path", recipe.opd_config_dir, "--config-name", method.opd_config,
            *common,
            # verl's own tracking, file backend: one JSON line per step at $VERL_FILE_LOGGER_PATH.
            "trainer.logger=[console,file]",
            *method.overrides,
        ]  # fmt: skip
        return Command(argv, env={**env, "VERL_FILE_LOGGER_PATH": metrics_file}, steps_file=metrics_file)
    raise ValueError(f"{method.name}: use sft_command for runner {method.runner!r}")


def thread_env(threads: int | None) -> dict[str, str]:
    """The environment that gives every process of a run ``threads`` torch threads (the CPU platform
    applies it in each, verl_npd/platform/cpu_threads.py); none: the share ``main_npd`` or the
    benchmark computes."""
    return {} if threads is None else {THREADS_ENV: str(threads)}


# The name the benchmark's served teacher answers to (npd.teacher.model).
SERVED_TEACHER_NAME = "teacher"


def served_teacher_command(teacher_dir: str, port: int, threads: int | None = None) -> Command:
    """``python -m verl_npd.serve`` on loopback: the teacher of a ``served_teacher`` method, with the
    method's threads per process (those of a teacher replica in the job)."""
    argv = [
        sys.executable, "-m", "verl_npd.serve", teacher_dir,
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_TEACHER_NAME,
    ]  # fmt: skip
    return Command(argv, env=thread_env(threads))


# The optimizer settings SFT copies from the NPD config (verl's FSDPOptimizerConfig, the same class in
# both trainers): everything but the step count, which verl fills in, and unset/deprecated fields.
SFT_OPTIM_KEYS = (
    "optimizer", "optimizer_impl", "lr", "lr_warmup_steps_ratio", "lr_warmup_steps", "weight_decay", "clip_grad",
    "min_lr_ratio", "num_cycles", "lr_scheduler_type", "zero_indexed_step",
)  # fmt: skip


def sft_command(
    npd_config: DictConfig, responses_parquet: str, run_dir: str, threads: int | None = None, save: bool = True
) -> Command:
    """verl's SFT trainer on the teacher's responses, with the NPD config's student, batch, optimiser,
    precision and token budget (``npd_config`` composed with the benchmark's run overrides). verl
    0.9.1's SFT trainer reads no seed (its sampler shuffles with a fixed one, and the student is
    loaded, not initialised): a seed varies SFT through the prompts of ``responses_parquet``.

    A checkpoint is saved at every validation step of the other methods (``trainer.test_freq``);
    the benchmark evaluates them afterwards with the same greedy exact-match as their validation.
    ``save=False`` (the thread trials): no checkpoints.
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
        *(f"optim.{key}={'null' if optim[key] is None else optim[key]}" for key in SFT_OPTIM_KEYS),
        f"optim.betas=[{','.join(str(b) for b in optim.betas)}]",
        f"trainer.device={npd_config.trainer.device}",
        f"trainer.total_training_steps={npd_config.trainer.total_training_steps}",
        # The responses file holds at least total_training_steps batches.
        "trainer.total_epochs=1",
        f"trainer.save_freq={npd_config.trainer.test_freq if save else -1}",
        "trainer.test_freq=-1",
        f"trainer.default_local_dir={run_dir}/checkpoints",
        "trainer.resume_mode=disable",
        "trainer.logger=[console]",
        "checkpoint.save_contents=[hf_model]",
        f"+timeline_path={timeline}",
        f"hydra.run.dir={run_dir}/hydra",
    ]  # fmt: skip
    # One process, rank 0 of 1 (sft_trainer.py sets up the gloo group from these).
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", **thread_env(threads)}
    env["MASTER_PORT"] = str(free_port())
    return Command(argv, env=env, steps_file=timeline)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""``python -m verl_npd.main_npd``: Near-Policy Distillation through verl.

With no arguments it runs the toy demo (``config/npd_toy.yaml``): it distils the embedded toy
teacher into the toy student on this machine's CPU (the toy world is built on first use and
cached). Any verl or ``npd.*`` setting can be overridden on the command line, Hydra-style, e.g.
``npd.sync_interval=4 trainer.logger='[console,tensorboard]'``; ``--config-path/--config-name``
select another config that extends ``config/npd_trainer.yaml`` (see ``recipes/``). ``--check``
(with ``--gpu-memory-gib N`` on a machine without the run's GPUs) only checks whether the run can
start and prints its resource plan (:mod:`verl_npd.trainer.readiness`).

Flow: compose the config (verl's ``ppo_trainer``, NPD's base and the ``npd:`` section), check
everything that can be checked before any Ray actor starts (so a bad run fails in seconds with a
message naming the field, never hangs), resolve it here, then let verl's ``run_ppo`` start Ray and
our task runner.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import threading
import warnings

import hydra
import ray
from omegaconf import DictConfig, OmegaConf

from verl_npd.losses.distill import NPDLossConfig
from verl_npd.platform.cpu_threads import share_cores
from verl_npd.platform.gpu_stack import use_sdpa_without_flash_attn
from verl_npd.trainer.console import LOG_NAME, LiveProgress, output_to_log
from verl_npd.trainer.memory import gpu_memory_here
from verl_npd.trainer.preflight import PreflightError, preflight
from verl_npd.trainer.readiness import CheckRequest, check_readiness, split_check_flags
from verl_npd.trainer.student_export import ask_for_hf_weights
from verl_npd.trainer.config import NPDConfig, store_npd_defaults, unknown_setting
from verl_npd.trainer.summary import format_summary

# Before Hydra composes: the npd: section's defaults.
store_npd_defaults()

# The toy demo's configs (main_npd's default) read the toy world through ${npd_toy:...}, and the
# cross-tokenizer demo its second teacher through ${npd_toy_cross:...} (verl_npd/toy/resolvers.py).
# The resolvers are registered only for a config that uses one, so that no other run imports the toy;
# only this process needs them: run_npd resolves the config before Ray starts.
TOY_RESOLVERS = ("npd_toy", "npd_toy_cross")


def register_toy_resolver_if_used(config: DictConfig) -> None:
    written = OmegaConf.to_yaml(config)  # unresolved: the interpolations as written
    if any(f"${{{name}:" in written for name in TOY_RESOLVERS):
        from verl_npd.toy.resolvers import register

        register()


@ray.remote(max_concurrency=3)  # other threads take request_stop() and progress() while run() trains
class NPDTaskRunner:
    """Builds verl's workers and the near-policy trainer inside Ray, like verl's ``TaskRunner``.
    ``npd_config``: the ``npd:`` section as the driver's preflight parsed it."""

    def __init__(self, npd_config: NPDConfig):
        self.npd_config = npd_config
        self.stop_requested = threading.Event()
        self.trainer = None

    def request_stop(self) -> None:
        self.stop_requested.set()
        if self.trainer is not None:
            self.trainer.request_stop()

    def progress(self) -> dict:
        """The trainer's latest figures for the console (empty until it trains)."""
        return {} if self.trainer is None else dict(self.trainer.progress)

    def run(self, config: DictConfig) -> dict:
        from verl.trainer.main_ppo_v0 import BaseTaskRunner
        from verl.trainer.ppo.utils import create_rl_dataset, create_rl_sampler
        from verl.utils.config import omega_conf_to_dataclass
        from verl.utils.dataset.rl_dataset import collate_fn
        from verl.workers.config import HFModelConfig

        from verl_npd.trainer.near_policy_trainer import NearPolicyTrainer

        print(f"NPD task runner on {socket.gethostname()}, pid {os.getpid()}")
        OmegaConf.resolve(config)
        roles = BaseTaskRunner()
        _, worker_group_cls = roles.add_actor_rollout_worker(config)
        roles.add_teacher_model_resource_pool(config)
        model_config: HFModelConfig = omega_conf_to_dataclass(config.actor_rollout_ref.model)
        datasets = {
            split: create_rl_dataset(
                files,
                config.data,
                model_config.tokenizer,
                model_config.processor,
                is_train=split == "train",
                max_samples=config.data.get(f"{split}_max_samples", -1),
            )
            for split, files in (("train", config.data.train_files), ("val", config.data.val_files))
        }
        trainer = NearPolicyTrainer(
            config=config,
            tokenizer=model_config.tokenizer,
            processor=model_config.processor,
            role_worker_mapping=roles.role_worker_mapping,
            resource_pool_manager=roles.init_resource_pool_mgr(config),
            ray_worker_group_cls=worker_group_cls,
            train_dataset=datasets["train"],
            val_dataset=datasets["val"],
            collate_fn=collate_fn,
            train_sampler=create_rl_sampler(config.data, datasets["train"]),
            npd_config=self.npd_config,
            stop_requested=self.stop_requested,
        )
        self.trainer = trainer
        trainer.init_workers()
        return trainer.fit()


class GracefulStop:
    """SIGTERM/SIGINT of the driver: ask the trainer to finish its step, checkpoint and return;
    exit with 128 + the signal's number. A second signal, or no answer within
    ``npd.shutdown_timeout_s``, exits at once (the last periodic checkpoint stays usable:
    checkpoints are written atomically).

    Passed to verl's ``run_ppo`` as its task runner class: ``run_ppo`` calls ``.remote()`` on it
    after ``ray.init``, which is where the runner's handle is kept and the handlers installed.
    """

    def __init__(self, npd_config: NPDConfig, console=None):
        self.npd_config = npd_config
        self.timeout_s = npd_config.shutdown_timeout_s
        # Where messages for the user go (the real console while the run's output goes to its log).
        self.console = console or sys.stderr
        self.progress: LiveProgress | None = None
        self.runner = None
        self.signum: int | None = None
        self._signalled = threading.Event()

    def remote(self):
        self.runner = NPDTaskRunner.remote(self.npd_config)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        # Ray calls are made from this thread, never from inside the signal handler.
        threading.Thread(target=self._forward_stop, name="npd-graceful-stop", daemon=True).start()
        if self.console is not sys.stderr:
            self.progress = LiveProgress(self.runner, self.console)
            self.progress.start()
        return self.runner

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None:
            print(f"verl-npd: second {signal.Signals(signum).name}: exiting now", file=self.console, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        self._signalled.set()

    def _forward_stop(self) -> None:
        self._signalled.wait()
        name = signal.Signals(self.signum).name
        print(
            f"verl-npd: {name}: finishing the current step and writing a checkpoint "
            f"(up to {self.timeout_s:.0f}s; send it again to exit at once)",
            file=self.console,
            flush=True,
        )
        self.runner.request_stop.remote()
        threading.Timer(self.timeout_s, self._give_up).start()

    def _give_up(self) -> None:
        print(f"verl-npd: no checkpoint after {self.timeout_s:.0f}s: exiting", file=self.console, flush=True)
        os._exit(128 + self.signum)


# verl/workers/engine/__init__.py:32-69 warns, in every process that imports it, about each optional
# engine backend that is not installed (torchtitan, veomni, automodel, mindspeed, megatron): lines
# that bury real output. Silenced in main_npd's processes only: the driver, and its Ray job's workers.
ENGINE_WARNINGS_MODULE = "verl.workers.engine"


def set_job_environment(config: DictConfig, loss: NPDLossConfig) -> None:
    """What every process of the Ray job gets in its environment, through verl's
    ``ray_kwargs.ray_init.runtime_env`` (which reaches workers on every node): ``npd.loss`` as
    ``VERL_NPD_LOSS``, the bridge into verl's training workers, whose loss config has no room for
    it; and the warnings filter above."""
    from verl_npd.losses.verl_registration import ENV_VAR, env_value

    env_vars = "ray_kwargs.ray_init.runtime_env.env_vars"
    OmegaConf.update(config, f"{env_vars}.{ENV_VAR}", env_value(loss), force_add=True)
    quiet = f"ignore::UserWarning:{ENGINE_WARNINGS_MODULE}"
    inherited = OmegaConf.select(config, f"{env_vars}.PYTHONWARNINGS") or os.environ.get("PYTHONWARNINGS")
    warnings_filters = f"{inherited},{quiet}" if inherited else quiet
    OmegaConf.update(config, f"{env_vars}.PYTHONWARNINGS", warnings_filters, force_add=True)


def run_npd(config: DictConfig) -> dict:
    """Check the config, run the trainer in Ray, print and return the summary."""
    from verl.trainer.main_ppo import run_ppo
    from verl.utils.device import auto_set_device, get_device_name

    auto_set_device(config)
    attention = use_sdpa_without_flash_attn(config)
    if attention:
        print(f"verl-npd: {attention}", file=sys.stderr)
    npd = preflight(config, gpu_memory_bytes=None if config.trainer.device == "cpu" else gpu_memory_here()).npd
    set_job_environment(config, npd.loss)
    OmegaConf.resolve(config)
    ask_for_hf_weights(config)
    if get_device_name() == "cpu":
        try:
            share_cores(config)
        except ValueError as e:
            raise PreflightError(str(e)) from e
    output_dir = os.path.abspath(npd.output_dir)
    # verl's tensorboard backend writes to $TENSORBOARD_DIR (default ./tensorboard_log); keep a run's
    # event files with the rest of its outputs. Ray workers inherit the driver's environment.
    os.environ.setdefault("TENSORBOARD_DIR", os.path.join(output_dir, "tensorboard"))
    if npd.verbose:
        graceful = GracefulStop(npd)
        run_ppo(config, task_runner_class=graceful)
        log_path = None
    else:
        log_path = os.path.join(output_dir, LOG_NAME)
        print(f"verl-npd: training; Ray's and verl's output goes to {log_path} (npd.verbose=true shows it here)")
        with output_to_log(log_path) as console:
            graceful = GracefulStop(npd, console=console)
            try:
                run_ppo(config, task_runner_class=graceful)
            except ray.exceptions.RayTaskError as failure:
                # The worker's traceback, in the log (stderr points there now) and on the console.
                print(str(failure), file=sys.stderr)
                print(str(failure), file=console)
                raise
            finally:
                if graceful.progress is not None:
                    graceful.progress.stop()
                # Ray's shutdown lines go to the log, not after the summary.
                ray.shutdown()
    with open(os.path.join(output_dir, "summary.json")) as f:
        summary = json.load(f)
    if graceful.progress is not None:
        for line in graceful.progress.missed_validations(summary["validations"]):
            print(line)
    print(format_summary(summary, output_dir, log_path))
    if graceful.signum is not None:
        name = signal.Signals(graceful.signum).name
        print(f"verl-npd: stopped by {name} after step {summary['last_checkpoint_step']}; checkpoint saved, "
              f"run the same command again to resume", file=sys.stderr)
        sys.exit(128 + graceful.signum)
    return summary


# ``--check`` on the command line (taken out before Hydra parses the rest): run the readiness check
# instead of training. Set by cli(), read by main(), whose signature Hydra fixes.
check_request: CheckRequest | None = None


@hydra.main(config_path="config", config_name="npd_toy", version_base=None)
def main(config: DictConfig) -> None:
    warnings.filterwarnings("ignore", category=UserWarning, module=re.escape(ENGINE_WARNINGS_MODULE) + r"\Z")
    register_toy_resolver_if_used(config)
    if check_request is not None:
        sys.exit(check_readiness(config, check_request.gpu_memory_gib))
    try:
        run_npd(config)
    except PreflightError as e:
        print(f"verl-npd: {e}", file=sys.stderr)
        sys.exit(2)
    except ray.exceptions.RayTaskError as e:
        # The traceback was logged above by Ray; end with the innermost cause on one line (an error
        # raised in a worker reaches here wrapped once per actor it crossed).
        cause = e.cause
        while isinstance(cause, ray.exceptions.RayTaskError):
            cause = cause.cause
        print(f"verl-npd: the run failed: {cause!r}", file=sys.stderr)
        sys.exit(1)


def cli() -> None:
    """``python -m verl_npd.main_npd``: ``--check`` and ``--gpu-memory-gib`` are ours, the rest Hydra's."""
    global check_request
    try:
        sys.argv, check_request = split_check_flags(sys.argv)
        check_npd_overrides(sys.argv[1:])
    except ValueError as e:
        print(f"verl-npd: {e}", file=sys.stderr)
        sys.exit(2)
    main()


def check_npd_overrides(args: list[str]) -> None:
    """An override of an ``npd.*`` key that NPD does not have fails here, in one line naming the
    nearest key, rather than in Hydra's several lines (``+npd.x=...`` adds a key, which the
    preflight then rejects just as plainly)."""
    for arg in args:
        key, is_override, _ = arg.partition("=")
        if is_override and key.startswith("npd."):
            problem = unknown_setting(key)
            if problem:
                raise ValueError(problem)


if __name__ == "__main__":
    cli()

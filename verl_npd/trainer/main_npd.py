"""``python -m verl_npd.main_npd``: Near-Policy Distillation through verl.

With no arguments it distils the embedded toy teacher into the toy student on this machine's CPU
(the toy world is built on first use and cached). Any verl or ``npd.*`` setting can be overridden
on the command line, Hydra-style, e.g. ``npd.sync_interval=4 trainer.logger='[console,tensorboard]'``;
``--config-path/--config-name`` select another recipe (see ``recipes/``).

Flow: compose verl's ``ppo_trainer`` config plus the ``npd:`` section, check everything that can
be checked before any Ray actor starts (so a bad run fails in seconds with a message naming the
field, never hangs), then let verl's ``run_ppo`` start Ray and our task runner.
"""

from __future__ import annotations

import json
import os
import socket
import sys

import hydra
import ray
from omegaconf import DictConfig, OmegaConf

from verl_npd.trainer.preflight import PreflightError, preflight
from verl_npd.trainer.summary import format_summary


@ray.remote
class NPDTaskRunner:
    """Builds verl's workers and the near-policy trainer inside Ray, like verl's ``TaskRunner``."""

    def run(self, config: DictConfig) -> dict:
        from verl.trainer.main_ppo_v0 import BaseTaskRunner
        from verl.trainer.ppo.utils import create_rl_dataset, create_rl_sampler
        from verl.utils.config import omega_conf_to_dataclass
        from verl.utils.dataset.rl_dataset import collate_fn
        from verl.workers.config import HFModelConfig

        from verl_npd.trainer.config import NPDConfig
        from verl_npd.trainer.near_policy_trainer import NearPolicyTrainer

        print(f"NPD task runner on {socket.gethostname()}, pid {os.getpid()}")
        OmegaConf.resolve(config)
        roles = BaseTaskRunner()
        _, worker_group_cls = roles.add_actor_rollout_worker(config)
        roles.add_teacher_model_resource_pool(config)
        model_config: HFModelConfig = omega_conf_to_dataclass(config.actor_rollout_ref.model)
        datasets = {
            split: create_rl_dataset(
                files, config.data, model_config.tokenizer, model_config.processor, is_train=split == "train"
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
            npd_config=NPDConfig.from_mapping(OmegaConf.to_container(config.npd, resolve=True)),
        )
        trainer.init_workers()
        return trainer.fit()


def run_npd(config: DictConfig) -> dict:
    """Check the config, run the trainer in Ray, print and return the summary."""
    from verl.trainer.main_ppo import run_ppo
    from verl.utils.device import auto_set_device

    auto_set_device(config)
    preflight(config)
    output_dir = os.path.abspath(config.npd.output_dir)
    # verl's tensorboard backend writes to $TENSORBOARD_DIR (default ./tensorboard_log); keep a run's
    # event files with the rest of its outputs. Ray workers inherit the driver's environment.
    os.environ.setdefault("TENSORBOARD_DIR", os.path.join(output_dir, "tensorboard"))
    run_ppo(config, task_runner_class=NPDTaskRunner)
    with open(os.path.join(output_dir, "summary.json")) as f:
        summary = json.load(f)
    print(format_summary(summary, output_dir))
    return summary


@hydra.main(config_path="../config", config_name="npd_trainer", version_base=None)
def main(config: DictConfig) -> None:
    try:
        run_npd(config)
    except PreflightError as e:
        print(f"verl-npd: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

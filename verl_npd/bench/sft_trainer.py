"""``python -m verl_npd.bench.sft_trainer``: verl's own SFT trainer (``verl.trainer.sft_trainer``) in
one process, with the wall-clock time of every step written to ``timeline_path``.

It takes verl's ``sft_trainer_engine`` config and overrides, plus ``+timeline_path=FILE``. Two things
differ from ``python -m verl.trainer.sft_trainer``, both outside verl's training code:

- the process group is plain ``gloo``: verl's ``run_sft`` asks for ``cpu:gloo,{device}:{backend}``
  (``verl/utils/distributed.py:63``), which is ``cpu:gloo,cpu:gloo`` on the CPU platform and which
  torch rejects (the Ray path is patched in ``verl_npd/platform/cpu_patches.py``; this one is not);
- verl's SFT trainer logs per-step metrics but no time, and the benchmark plots accuracy against
  wall-clock: each update and each checkpoint save is timed. Checkpoints are written only so that the
  benchmark can evaluate them, so their save time is left out of the step times.

Run it with ``RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=<free port>``.
"""

from __future__ import annotations

import json
import time

import hydra
import torch.distributed
from omegaconf import DictConfig, open_dict
from verl.trainer.sft_trainer import SFTTrainer
from verl.utils import tensordict_utils as tu
from verl.utils.device import auto_set_device


class TimedSFTTrainer(SFTTrainer):
    """verl's SFTTrainer; each call of ``train_batch`` appends ``{step, wall_s, train_s, tokens}``."""

    def __init__(self, config: DictConfig, timeline_path: str):
        super().__init__(config)
        self.timeline_path = timeline_path

    def fit(self):
        start = time.perf_counter()
        saving_s = 0.0
        step = 0
        train_batch = self.training_client.train_batch
        save_checkpoint = self.ckpt_handler.save_checkpoint

        def timed_train_batch(data):
            nonlocal step
            step_start = time.perf_counter()
            output = train_batch(data=data)
            now = time.perf_counter()
            step += 1
            row = {
                "step": step,
                "wall_s": now - start - saving_s,
                "train_s": now - step_start,
                "tokens": sum(tu.get(data, "global_token_num")),
            }
            with open(self.timeline_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            return output

        def untimed_save_checkpoint(*args, **kwargs):
            nonlocal saving_s
            save_start = time.perf_counter()
            save_checkpoint(*args, **kwargs)
            saving_s += time.perf_counter() - save_start

        # Instance attributes shadow the methods that verl's fit() calls; nothing else changes.
        self.training_client.train_batch = timed_train_batch
        self.ckpt_handler.save_checkpoint = untimed_save_checkpoint
        super().fit()


@hydra.main(config_path="pkg://verl.trainer.config", config_name="sft_trainer_engine", version_base=None)
def main(config: DictConfig) -> None:
    auto_set_device(config)
    with open_dict(config):
        timeline_path = config.pop("timeline_path")
    torch.distributed.init_process_group("gloo")
    try:
        TimedSFTTrainer(config, timeline_path).fit()
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

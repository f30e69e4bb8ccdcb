"""verl's built-in on-policy distillation runs on CPU through verl's own entry point, with the
plugin's platform, rollout backend and loss, on 2 data-parallel trainer ranks (so that NPD and the
baseline can be compared at equal width): finite losses, and after every weight sync the rollout
server's log-probs equal the trainer's."""

import re

from conftest import run_module

RECIPE = ["--config-path", "pkg://verl_npd.config.toy_opd", "--config-name", "opd_baseline"]


def metric(line: str, name: str) -> float:
    match = re.search(rf" - {re.escape(name)}:(?:np\.float64\()?(-?[0-9.eE+-]+|nan|inf)", line)
    assert match, f"{name} missing from: {line[:300]}"
    return float(match.group(1))


def test_verl_main_ppo_distils_on_cpu(toy_world, tmp_path):
    result = run_module(
        "verl.trainer.main_ppo",
        [
            *RECIPE,
            "trainer.total_training_steps=3",
            "trainer.test_freq=3",
            "data.val_max_samples=64",
            f"trainer.default_local_dir={tmp_path / 'ckpt'}",
            "trainer.n_gpus_per_node=2",
            "ray_kwargs.ray_init.num_gpus=3",
            # verl's own recomputation of the old log-probs (the baseline bypasses it): it reports how
            # far the rollout's log-probs are from the trainer's, which shows the weight sync exact.
            "algorithm.rollout_correction.bypass_mode=false",
        ],
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = [line for line in result.stdout.splitlines() if re.search(r"step:[1-3] - ", line)]
    assert len(steps) == 3, result.stdout[-3000:]
    # Two FSDP ranks trained: Ray prefixes each worker process's output with its pid.
    assert len(set(re.findall(r"\(WorkerDict pid=(\d+)", result.stdout + result.stderr))) == 2
    for line in steps:
        loss = metric(line, "actor/distillation/loss")
        assert 0 <= loss < 20
        # The rollout server samples with the weights the trainer just synced (fp32 on both sides):
        # the trainer's recomputed log-probs of the sampled tokens match the server's.
        assert metric(line, "training/rollout_probs_diff_max") < 1e-3
        assert metric(line, "timing_s/update_weights") > 0
    # verl's validation with the toy reward: exact-match rewards (0 or 1) over the 64 prompts.
    accuracy = metric(steps[-1], "val-core/npd_toy_arith/acc/mean@1")
    assert accuracy * 64 == round(accuracy * 64), accuracy

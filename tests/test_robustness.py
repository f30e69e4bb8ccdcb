"""Faults and resume on the real stack (issue 6): SIGTERM/SIGINT, a dying rollout server, and a
run killed with SIGKILL that resumes to the same student as an uninterrupted run."""

import asyncio
import json
import os
import re
import signal
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    FAST,
    REPO,
    check_every_position_accounted_for_once,
    kill_session,
    read_jsonl,
    run_module,
    start_npd,
    steps_logged,
    tail,
    wait_for,
)
from verl_npd.rollout.scoring import RequestFailed, call_with_retries
from verl_npd.trainer.checkpoints import checkpoint_problem

QUIET = ["trainer.val_before_train=false", "trainer.test_freq=-1"]
BATCH = 16  # FAST's data.train_batch_size


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_the_finished_steps_and_exits_nonzero(toy_world, tmp_path, signum):
    out = tmp_path / "run"
    ckpt = out / "ckpt"  # where check_every_position_accounted_for_once reads it
    args = [*FAST, *QUIET, f"npd.output_dir={out}", f"trainer.default_local_dir={ckpt}", "trainer.total_training_steps=20",
            "trainer.save_freq=-1"]
    log = tmp_path / "log.txt"
    process = start_npd(args, log)
    wait_for(lambda: steps_logged(out) >= 2, process, log, "step 2")
    process.send_signal(signum)
    try:
        returncode = process.wait(timeout=300)
    finally:
        kill_session(process)
    assert returncode == 128 + signum, tail(log)
    latest = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    # Periodic checkpoints are off: this one was written on the way out, after the last finished step.
    assert latest >= 2
    assert json.loads((ckpt / f"global_step_{latest}" / "npd" / "state.json").read_text())["step"] == latest
    assert [row["step"] for row in read_jsonl(out / "metrics.jsonl")] == list(range(1, latest + 1))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and summary["last_checkpoint_step"] == latest
    assert checkpoint_problem(str(ckpt / f"global_step_{latest}")) is None
    check_every_position_accounted_for_once(out, latest, BATCH)


def test_dead_servers_with_no_replica_left_stop_the_run_with_a_checkpoint_and_a_clear_error(toy_world, tmp_path):
    out = tmp_path / "run"
    ckpt = out / "ckpt"
    args = [*FAST, *QUIET, f"npd.output_dir={out}", f"trainer.default_local_dir={ckpt}", "trainer.total_training_steps=20",
            "trainer.save_freq=-1", "npd.generation.max_retries=1"]
    log = tmp_path / "log.txt"
    process = start_npd(args, log)
    wait_for(lambda: steps_logged(out) >= 2, process, log, "step 2")
    servers = [p for p in psutil.process_iter(["cmdline"]) if "CPURolloutServer" in " ".join(p.info["cmdline"] or [])]
    assert servers, "no npd_cpu server process found"
    for server in servers:  # the student's rollout server and the teacher's
        server.kill()
    try:
        returncode = process.wait(timeout=300)
    finally:
        kill_session(process)
    output = log.read_text()
    assert returncode == 1, tail(log)
    # The kill lands during a generation or a scoring (no replica is left to take the work) or
    # during a weight sync (not retried: the server's weights would be half-written); either way
    # the error says what died.
    assert "verl-npd: the run failed" in output, tail(log)
    died = "rollout server npd_cpu_server_0_0 failed: its process died"
    no_replica_left = re.search(r"every (rollout|teacher '\w+') server has died", output)
    assert no_replica_left or died in output, tail(log)
    latest = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert latest == steps_logged(out) >= 2  # every finished step is in the checkpoint
    assert checkpoint_problem(str(ckpt / f"global_step_{latest}")) is None
    check_every_position_accounted_for_once(out, latest, BATCH)


def test_steps_with_non_finite_gradients_are_counted_and_a_streak_ends_the_run(toy_world, tmp_path):
    """An absurd learning rate: step 1's update (finite gradient) blows the weights up, so from step
    2 on the loss and gradient are NaN and verl skips each update. Steps 2 and 3 are counted; with
    npd.max_nonfinite_steps=2 the run ends after step 3 with an error naming the streak and a
    checkpoint holding every finished step. Weights sync every 4 steps here, so the rollout never
    gets the blown-up weights (which end a run at once: test_non_finite_rollout_log_probs_end_the_run)."""
    out = tmp_path / "run"
    ckpt = out / "ckpt"
    args = [*QUIET, f"npd.output_dir={out}", f"trainer.default_local_dir={ckpt}", "trainer.total_training_steps=8",
            "trainer.save_freq=-1", "data.train_batch_size=32", "actor_rollout_ref.actor.optim.lr=1e30",
            "npd.max_nonfinite_steps=2", "npd.sync_interval=4", "npd.buffer.max_staleness=3",
            "trainer.logger=[console]"]  # fmt: skip
    result = run_module("verl_npd.main_npd", args, timeout=600)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(
        r"steps 2-3 had non-finite gradients \(the last's norm nan, loss nan\); verl skipped their updates, so the "
        r"weights are those after step 1\. npd.max_nonfinite_steps=2 in a row end the run",
        result.stderr,
    ), result.stderr[-3000:]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [(row["step"], row["npd/nonfinite_steps"]) for row in rows] == [(1, 0.0), (2, 1.0), (3, 2.0)]
    assert torch.isfinite(torch.tensor(rows[0]["actor/grad_norm"])) and rows[1]["actor/grad_norm"] != rows[1]["actor/grad_norm"]
    assert "WARN: grad_norm is not finite" in (out / "run.log").read_text()  # verl's skip
    assert int((ckpt / "latest_checkpointed_iteration.txt").read_text()) == 3
    assert checkpoint_problem(str(ckpt / "global_step_3")) is None
    check_every_position_accounted_for_once(out, 3, 32)


def test_non_finite_rollout_log_probs_end_the_run():
    """NaN log-probs from the rollout would make every IFD NaN and the filter keep nothing: the
    trainer would wait forever (an absurd learning rate, before this check: no step after 3 in 8
    minutes). The wave fails instead, naming the weights."""
    from verl_npd.rollout.async_manager import PromptItem, Rollout, check_finite_log_probs

    def rollout(position, log_probs):
        prompt = PromptItem(position=position, prompt_ids=[1, 2], routing_key=None, extra={})
        return Rollout(prompt=prompt, response_ids=[3] * len(log_probs), log_probs=log_probs, version=2, spans_sync=False)

    check_finite_log_probs([rollout(0, [-0.5, -1.0]), rollout(1, [])])
    with pytest.raises(RuntimeError, match=r"non-finite log-probs for prompt #7 \(weights of version 2\)"):
        check_finite_log_probs([rollout(0, [-0.5]), rollout(7, [-0.1, float("nan")])])


def test_a_finite_step_ends_a_streak_of_non_finite_ones():
    from types import SimpleNamespace

    from verl_npd.trainer.near_policy_trainer import NearPolicyTrainer, NonFiniteTraining

    trainer = SimpleNamespace(nonfinite_steps=0, nonfinite_streak=0, npd=SimpleNamespace(max_nonfinite_steps=2))
    norms = [1.0, float("nan"), 2.0, float("inf"), float("nan")]
    outcomes, counted = [], []
    for step, norm in enumerate(norms, 1):
        metrics = {"actor/grad_norm": norm, "actor/loss": 0.5}
        outcomes.append(NearPolicyTrainer._count_nonfinite(trainer, step, metrics))
        counted.append(metrics["npd/nonfinite_steps"])
    assert outcomes[:4] == [None] * 4 and isinstance(outcomes[4], NonFiniteTraining)
    assert str(outcomes[4]).startswith("steps 4-5 had non-finite gradients (the last's norm nan, loss 0.5)")
    assert counted == [0.0, 1.0, 1.0, 2.0, 3.0]


def test_a_hung_request_is_retried_a_bounded_number_of_times_then_fails():
    attempts = []

    async def hangs():
        attempts.append(time.monotonic())
        await asyncio.sleep(3600)

    start = time.monotonic()
    with pytest.raises(RequestFailed, match="teacher scoring of prompt #7 failed after 3 attempts"):
        asyncio.run(call_with_retries(hangs, "teacher scoring of prompt #7", timeout_s=0.05, max_retries=2))
    assert len(attempts) == 3
    assert time.monotonic() - start < 5


def test_a_transient_failure_is_retried_and_recovers():
    attempts = []

    async def flaky():
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("server restarting")
        return "ok"

    assert asyncio.run(call_with_retries(flaky, "rollout request", timeout_s=5, max_retries=1)) == "ok"
    assert len(attempts) == 2


def test_the_package_never_unpickles_nor_trusts_remote_code_on_its_own():
    """Our formats are json, safetensors and parquet; remote code runs only if the user's config
    says trust_remote_code (the value is passed through, never set True here)."""
    forbidden = re.compile(r"trust_remote_code\s*=\s*True|torch\.load\(|pickle\.loads?\(|weights_only\s*=\s*False")
    hits = []
    for root, _, files in os.walk(os.path.join(REPO, "verl_npd")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path) as f:
                    hits += [f"{path}:{i}" for i, line in enumerate(f, 1) if forbidden.search(line.split("#")[0])]
    assert hits == []


# One wave in flight, a sync after every step and on-policy samples: which samples each step trains
# on no longer depends on timing, and per-sample seeds make what they contain reproducible.
DETERMINISTIC = [
    "npd.sync_interval=1",
    "npd.buffer.max_staleness=0",
    "npd.generation.max_concurrent_prompts=16",
    "trainer.total_training_steps=4",
    "trainer.save_freq=2",
    "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
    "actor_rollout_ref.actor.checkpoint.load_contents=[model,optimizer,extra]",
]


def test_sigkill_then_resume_equals_an_uninterrupted_run(toy_world, tmp_path):
    def args(name):
        return [*FAST, *QUIET, *DETERMINISTIC, f"npd.output_dir={tmp_path / name}",
                f"trainer.default_local_dir={tmp_path / name / 'ckpt'}"]

    straight = run_module("verl_npd.main_npd", args("straight"), timeout=900)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]

    log = tmp_path / "log.txt"
    process = start_npd(args("killed"), log)
    marker = tmp_path / "killed" / "ckpt" / "latest_checkpointed_iteration.txt"
    wait_for(marker.exists, process, log, "the step-2 checkpoint")
    kill_session(process)
    assert marker.read_text() == "2"
    step_dir = tmp_path / "killed" / "ckpt" / "global_step_2"
    assert not (step_dir / "data.pt").exists()  # verl's pickled dataloader state is not written
    assert {p.suffix for p in (step_dir / "npd").iterdir()} == {".json", ".safetensors"}
    resumed = run_module("verl_npd.main_npd", args("killed"), timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    expected, got = (read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("straight", "killed"))
    assert [row["step"] for row in got] == [1, 2, 3, 4]  # nothing repeated, nothing skipped
    for a, b in zip(expected, got):
        # The same samples in the same order: same token count, behaviour versions and loss.
        assert a["perf/train_tokens"] == b["perf/train_tokens"]
        assert a["npd/behaviour_version_min"] == b["npd/behaviour_version_min"]
        assert b["actor/loss"] == pytest.approx(a["actor/loss"], rel=1e-4)
    final = [
        load_file(str(tmp_path / name / "ckpt" / "global_step_4" / "actor" / "huggingface" / "model.safetensors"))
        for name in ("straight", "killed")
    ]
    assert final[0].keys() == final[1].keys()
    for key in final[0]:
        torch.testing.assert_close(final[1][key], final[0][key], rtol=1e-4, atol=1e-5)
    counters = [json.loads((tmp_path / n / "summary.json").read_text())["buffer"] for n in ("straight", "killed")]
    assert counters[1]["consumed"] == counters[0]["consumed"] == 4 * 16


def test_served_teachers_killed_mid_run_fail_over_and_are_waited_for(toy_world, tmp_path):
    """npd.teacher.url with two servers of the toy teacher (no logical GPU for the teacher: the
    trainer's one is enough). Once step 1 is logged, server A is SIGKILLed: B scores alone. Once
    step 3 is logged, B is killed too and A restarted 5 s later: scoring waits for a server, and A,
    back, takes all the work. The run trains every step; no stream position is trained twice; the
    client's retries name both URLs."""
    from test_remote_teacher import _free_port, _start_server, _stop

    ports = [_free_port(), _free_port()]
    servers = [_start_server(toy_world.teacher_dir, port) for port in ports]
    urls = [f"http://127.0.0.1:{port}/v1" for port in ports]
    out, log = tmp_path / "run", tmp_path / "npd.log"
    args = [*FAST, *QUIET, f"npd.output_dir={out}", "trainer.total_training_steps=8", f"npd.teacher.url=[{','.join(urls)}]",
            "npd.teacher.model=toy", "ray_kwargs.ray_init.num_gpus=1"]  # fmt: skip
    process = start_npd(args, log)
    try:
        wait_for(lambda: steps_logged(out) >= 1, process, log, "the first step")
        _stop(servers[0])
        wait_for(lambda: steps_logged(out) >= 3, process, log, "step 3, scored by B alone")
        _stop(servers[1])
        time.sleep(5)
        servers[0] = _start_server(toy_world.teacher_dir, ports[0])
        assert process.wait(timeout=900) == 0, tail(log)
    finally:
        if process.poll() is None:
            kill_session(process)
        for server in servers:
            if server.poll() is None:
                _stop(server)
    rows = read_jsonl(out / "positions.jsonl")
    assert [row["step"] for row in rows] == list(range(1, 9))
    trained = [p for row in rows for p in row["trained"]]
    assert len(trained) == len(set(trained)) == 8 * 16
    # The retries were logged by the rollout manager, whose output goes to the run's log.
    run_log = (out / "run.log").read_text()
    for url in urls:
        assert f"teacher server {url}/completions failed" in run_log, tail(log)

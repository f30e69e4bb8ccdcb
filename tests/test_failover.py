"""Faults in a run with spare replicas (issue 25): 2 standalone student rollout replicas synced
through ``npd_gloo``, 2 teacher replicas and 1 trainer rank, in a one-node Ray cluster the test
starts (its state API names each actor and its process). One run, three faults at moments drawn
with a fixed seed:

1. a student replica's server is frozen (SIGSTOP) for a moment, so that requests are in flight on
   it, then SIGKILLed: the replica is taken out (verl's load balancer, the weight syncs) and its
   requests start again on the other one;
2. the same for a teacher replica, mid-scoring: its sequences go to the other teacher replica;
3. the surviving student replica's weight-sync worker is frozen, so that the trainer waits inside
   its next weight sync, and the driver gets SIGTERM there: the sync finishes first, and the run
   stops with a checkpoint of that step, whose weights the rollout holds.

Nothing is lost: every stream position below the cursor is accounted for exactly once by the
position record and the final checkpoint, which is complete by its manifest."""

import json
import os
import random
import signal
import time

from conftest import (
    FAST,
    RAY_ENV,
    check_every_position_accounted_for_once,
    kill_session,
    ray_cluster,
    read_jsonl,
    start_npd,
    steps_logged,
    tail,
    wait_for,
)

STEPS = 40  # more than the run reaches: it ends with the SIGTERM
BATCH = 16  # FAST's data.train_batch_size
LAYOUT = [
    "actor_rollout_ref.rollout.nnodes=1",
    "actor_rollout_ref.rollout.n_gpus_per_node=2",
    "actor_rollout_ref.rollout.checkpoint_engine.backend=npd_gloo",
    "distillation.n_gpus_per_node=2",
    "distillation.teacher_models.teacher_model.num_replicas=2",
    # Joining the test's cluster: its node brings the resources.
    "ray_kwargs.ray_init.num_cpus=null",
    "ray_kwargs.ray_init.num_gpus=null",
]
# 1 trainer + 2 standalone student replicas + 2 teacher replicas; verl reserves 3 CPUs a bundle.
NODE = (24, 5)
# How long a server stays frozen before it is killed: the work sent to it meanwhile is in flight.
FREEZE_S = 2.0
# The trainer waits in the sync on the frozen worker: no step for this long means it is there.
STALL_S = 8.0
_draw = random.Random(25)
STUDENT_VICTIM = _draw.choice([1, 2])  # the standalone replicas' ranks follow the colocated one (0)
SURVIVOR = 3 - STUDENT_VICTIM
TEACHER_VICTIM = _draw.choice([0, 1])
STUDENT_KILL = _draw.choice(range(2, 5))  # after this step is logged
TEACHER_KILL = STUDENT_KILL + _draw.choice(range(2, 5))
SYNC_STOP = TEACHER_KILL + _draw.choice(range(2, 5))


def alive_actors(dashboard: str) -> dict[str, int]:
    """Each live named actor's process id, by its name."""
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False)
    return {a.name: a.pid for a in actors if a.name}


def synced_at_or_after(out, step: int) -> bool:
    """The last step logged is ``step`` or later, and synced the weights."""
    path = out / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []  # a line being written has no end yet
    last = json.loads(lines[-1]) if lines else {}
    return last.get("step", 0) >= step and "timing/sync" in last


def freeze_then_kill(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    time.sleep(FREEZE_S)
    os.kill(pid, signal.SIGKILL)


def wait_until_steps_stall(out, process, log) -> int:
    """Wait until no step has been logged for STALL_S; the last step logged."""
    last, since = steps_logged(out), time.monotonic()
    while time.monotonic() - since < STALL_S:
        assert process.poll() is None, tail(log)
        time.sleep(0.5)
        if (now := steps_logged(out)) != last:
            last, since = now, time.monotonic()
    return last


def test_dead_replicas_fail_over_and_a_sigterm_inside_a_weight_sync_stops_at_its_version(toy_world, tmp_path):
    from verl_npd.trainer.checkpoints import checkpoint_problem

    out, log = tmp_path / "run", tmp_path / "log.txt"
    ckpt = out / "ckpt"  # where check_every_position_accounted_for_once reads it
    args = [*FAST, *LAYOUT, "trainer.val_before_train=false", "trainer.test_freq=-1", "trainer.save_freq=-1",
            f"trainer.total_training_steps={STEPS}", f"npd.output_dir={out}", f"trainer.default_local_dir={ckpt}"]
    with ray_cluster([NODE]) as (address, dashboard):
        process = start_npd(args, log, env={**RAY_ENV, "RAY_ADDRESS": address})
        try:
            # Right after a step that synced: the next sync is a step away at least, so the freeze
            # cannot catch a sync in the middle of its transfer (a death there ends the run).
            wait_for(lambda: synced_at_or_after(out, STUDENT_KILL), process, log, f"a sync at step {STUDENT_KILL} or after",
                     timeout=600, poll_s=0.1)  # fmt: skip
            actors = alive_actors(dashboard)
            freeze_then_kill(actors[f"npd_cpu_server_{STUDENT_VICTIM}_0"])
            wait_for(lambda: steps_logged(out) >= TEACHER_KILL, process, log, f"step {TEACHER_KILL}", timeout=300)
            (teacher,) = [pid for name, pid in actors.items() if name.startswith(f"npd_cpu_server_teacher_{TEACHER_VICTIM}_")]
            freeze_then_kill(teacher)
            wait_for(lambda: steps_logged(out) >= SYNC_STOP, process, log, f"step {SYNC_STOP}", timeout=300)
            workers = [pid for name, pid in alive_actors(dashboard).items() if name.startswith(f"rollout_standalone_{SURVIVOR}")]
            assert workers, alive_actors(dashboard)
            for pid in workers:
                os.kill(pid, signal.SIGSTOP)
            stopped_at = wait_until_steps_stall(out, process, log)
            process.send_signal(signal.SIGTERM)
            time.sleep(FREEZE_S)
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
            returncode = process.wait(timeout=300)
            dead_workers = [name for name in alive_actors(dashboard) if name.startswith(f"rollout_standalone_{STUDENT_VICTIM}")]
        finally:
            kill_session(process)
    assert returncode == 128 + signal.SIGTERM, tail(log)
    summary = json.loads((out / "summary.json").read_text())

    # The dead replicas were taken out, each with work in flight that went to the other; the dead
    # student replica's workers were stopped with it.
    lost = {entry["servers"]: entry for entry in summary["servers_lost"]}
    assert lost["rollout"]["dead"] == [f"student rollout replica {STUDENT_VICTIM}"], lost
    # verl keys a teacher by its routing key ('default' for one teacher), not its YAML name.
    assert lost["teacher 'default'"]["dead"] == [f"teacher 'default' replica {TEACHER_VICTIM}"], lost
    assert lost["rollout"]["moved"] >= 1 and lost["teacher 'default'"]["moved"] >= 1, lost
    assert not dead_workers, dead_workers
    # Training went on after both deaths, with every sync reaching the surviving replica: its
    # samples were at most the staleness bound old.
    history = read_jsonl(out / "metrics.jsonl")
    assert len(history) > TEACHER_KILL and max(row["npd/staleness_max"] for row in history) <= 2

    # The SIGTERM came while the trainer waited in the sync after step `stopped_at`; the sync
    # finished, and the run stopped at that step with a complete checkpoint of it.
    assert summary["stopped_during_sync"] == stopped_at + 1 == history[-1]["step"], (summary, stopped_at)
    assert history[-1]["timing/sync"] > 0
    assert summary["interrupted"] and summary["last_checkpoint_step"] == stopped_at + 1
    assert int((ckpt / "latest_checkpointed_iteration.txt").read_text()) == stopped_at + 1
    assert checkpoint_problem(str(ckpt / f"global_step_{stopped_at + 1}")) is None
    check_every_position_accounted_for_once(out, stopped_at + 1, BATCH)

"""Lossless resume at the default settings (issue 15, items 3 and 4): asynchronous generation,
``sync_interval=2``, ``max_staleness=2``, the Δ-IFD filter on, several waves in flight (batches of
32 prompts, up to 128 prompts in flight: the buffer lets about 3 waves run ahead of the trainer).

Two runs of the same seed and steps share the module: an uninterrupted one (1 trainer rank), and
one on 2 trainer ranks that is SIGKILLed twice, at moments drawn with a seeded random after its
first checkpoint, and resumed each time with 2 ranks: first just after a checkpoint, then, in the
resumed run, between two checkpoints (steps trained after the last checkpoint are rolled back).

What is compared. Waves run concurrently but enter the buffer in the order they started, not the
order they finish, and under the default ``stale_policy=wait`` each wave starts when the trainer's
progress makes room for it; so at these settings each step's samples do not depend on timing, and
the killed run trains the same samples step for step as the uninterrupted one, with the same loss.
(Before waves were ordered, reference runs of the same seed followed one of two trajectories, by
which of the first two waves finished first.) Checked for both runs against the prompt stream itself: every
stream position below the final cursor is accounted for exactly once over the whole run (each
killed part up to its checkpoint, then the resumed part): trained, filtered or dropped as stale in
one step, or queued or in flight at the final checkpoint; nothing is trained twice, nothing is
missing, and the buffer's counters, carried across the kills, agree with that record. Weights are
not compared bit for bit: the killed run trains on 2 ranks, the uninterrupted one on 1.
"""

import json
import os
import random
import shutil

import pytest

from conftest import (
    check_every_position_accounted_for_once,
    checkpoint_state,
    kill_session,
    read_jsonl,
    run_module,
    start_npd,
    steps_logged,
    wait_for,
)

STEPS = 10
SAVE_FREQ = 2
BATCH = 32  # prompts per step, one sample each: waves of more than npd.filter.min_window (20) are band-filtered
ACCURACY = "val-core/npd_toy_arith/acc/mean@1"
# Uninterrupted runs of these settings (same seed; greedy, 64 validation prompts) ended at 0.297
# and 0.391 before waves were ordered (the two trajectories above), and at 0.297 since, as did the
# killed run. The band allows that spread (6 prompts) and 2 prompts more: a near tie may flip.
ACCURACY_BAND = 8 / 64
TWO_RANKS = ["trainer.n_gpus_per_node=2", "ray_kwargs.ray_init.num_gpus=3"]
# The kill moments, drawn with a fixed seed: reproducible, and not chosen by hand. The first kill
# comes as soon as the checkpoint of step FIRST_KILL is written; the second once the resumed run
# has written a checkpoint of its own and logged step SECOND_KILL, which has none.
_draw = random.Random(15)
FIRST_KILL = _draw.choice(range(SAVE_FREQ, STEPS // 2 + 1, SAVE_FREQ))
SECOND_KILL = _draw.choice(range(FIRST_KILL + SAVE_FREQ + 1, STEPS, SAVE_FREQ))


def npd_args(out, extra=()) -> list[str]:
    return [
        f"data.train_batch_size={BATCH}",
        "data.val_max_samples=64",
        "trainer.logger=[console]",
        f"npd.output_dir={out}",
        f"trainer.default_local_dir={out / 'ckpt'}",
        f"trainer.total_training_steps={STEPS}",
        f"trainer.save_freq={SAVE_FREQ}",
        "trainer.val_before_train=false",
        f"trainer.test_freq={STEPS}",
        *extra,
    ]


def latest_checkpoint(out) -> int:
    marker = out / "ckpt" / "latest_checkpointed_iteration.txt"
    return int(marker.read_text()) if marker.exists() else 0


def run_until_killed(out, log, kill_when) -> dict:
    """Run (or resume) to STEPS, SIGKILL the whole session once ``kill_when()`` holds; return what
    the killed run left: its last checkpoint, the steps it had logged and its position record."""
    process = start_npd(npd_args(out, TWO_RANKS), log)
    try:
        wait_for(kill_when, process, log, "the kill moment", poll_s=0.1)
    finally:
        kill_session(process)
    return {
        "checkpoint": latest_checkpoint(out),
        "steps_logged": steps_logged(out),
        "positions": read_jsonl(out / "positions.jsonl"),
    }


@pytest.fixture(scope="module")
def runs(toy_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    straight = run_module("verl_npd.main_npd", npd_args(root / "straight"), timeout=900)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    out = root / "killed"
    first = run_until_killed(out, root / "first.log", lambda: latest_checkpoint(out) >= FIRST_KILL)
    second = run_until_killed(out, root / "second.log", lambda: steps_logged(out) >= SECOND_KILL)
    faults = break_checkpoints(out, second["checkpoint"])
    failed = run_module("verl_npd.main_npd", npd_args(out, TWO_RANKS), timeout=900)
    faults.update(returncode=failed.returncode, stderr=failed.stderr, log=(out / "run.log").read_text(),
                  checkpoint=latest_checkpoint(out))  # fmt: skip
    os.remove(faults["blocker"])  # the cause fixed: the same command resumes
    resumed = run_module("verl_npd.main_npd", npd_args(out, TWO_RANKS), timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return root, [first, second], faults


def break_checkpoints(out, newest: int) -> dict:
    """Two faults for the next resume: the newest checkpoint gets a truncated shard (a torn write
    on a lost node's disk), and the checkpoint two steps after it cannot be written (its npd/ is a
    file, as a full disk or a lost mount would fail the write)."""
    shard = out / "ckpt" / f"global_step_{newest}" / "actor" / "model_world_size_2_rank_1.pt"
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    blocked = out / "ckpt" / f"global_step_{newest + SAVE_FREQ}"
    shutil.rmtree(blocked, ignore_errors=True)  # a step the kill cut short may have begun it
    blocked.mkdir(parents=True)
    (blocked / "npd").write_text("")
    return {"truncated": (newest, size // 2, size), "blocker": blocked / "npd"}


def test_the_uninterrupted_run_accounts_for_every_position_once(runs):
    root, *_ = runs
    out = root / "straight"
    check_every_position_accounted_for_once(out, STEPS, BATCH)
    history = read_jsonl(out / "metrics.jsonl")
    # The default settings at work: samples up to the bound of 2 versions old, and the filter drops.
    assert max(row["npd/staleness_max"] for row in history) == 2
    assert any(row["filtered"] for row in read_jsonl(out / "positions.jsonl"))


def test_a_run_killed_twice_resumes_losing_nothing_and_training_nothing_twice(runs):
    root, (first, second), _ = runs
    out = root / "killed"
    assert first["checkpoint"] == FIRST_KILL  # killed right after this checkpoint
    assert first["checkpoint"] < second["checkpoint"] < second["steps_logged"]  # steps were rolled back
    for left in (first, second):
        # The checkpoint resumed from held work in progress: queued samples and prompts in flight.
        state, queued = checkpoint_state(out, left["checkpoint"])
        assert queued and state["stream"]["reissue"], state
    # Each resume kept the record up to its checkpoint and dropped the rolled-back steps.
    final = read_jsonl(out / "positions.jsonl")
    assert second["positions"][: first["checkpoint"]] == first["positions"][: first["checkpoint"]]
    assert final[: second["checkpoint"]] == second["positions"][: second["checkpoint"]]
    check_every_position_accounted_for_once(out, STEPS, BATCH)


def test_the_killed_run_trains_the_same_samples_step_for_step_as_the_uninterrupted_one(runs):
    """Waves enter the buffer in the order they started, so each step's samples do not depend on
    timing: the resumed run (2 ranks) trains what the uninterrupted one (1 rank) does, with the
    same loss (the loss does not depend on the number of ranks)."""
    root, *_ = runs
    (straight, killed), (straight_history, killed_history) = (
        [read_jsonl(root / name / record) for name in ("straight", "killed")]
        for record in ("positions.jsonl", "metrics.jsonl")
    )
    assert [sorted(row["trained"]) for row in killed] == [sorted(row["trained"]) for row in straight]
    for a, b in zip(straight_history, killed_history):
        assert b["actor/loss"] == pytest.approx(a["actor/loss"], rel=1e-4)


def test_a_truncated_checkpoint_is_skipped_and_named_and_a_failed_write_keeps_the_last_one(runs):
    """The resume after the second kill finds the newest checkpoint's shard truncated: it resumes
    from the checkpoint before, saying which it skipped and why; then the write of a later
    checkpoint fails: the run ends naming it and the checkpoint still intact, which the next
    resume uses. Nothing is lost or trained twice over all of it (checked on the final record)."""
    root, (_, second), faults = runs
    newest, truncated, size = faults["truncated"]
    assert newest == second["checkpoint"]
    assert (
        f"verl-npd: skipped unusable checkpoints (step {newest}: actor/model_world_size_2_rank_1.pt has {truncated} "
        f"bytes, {size} when it was written); resuming from step {newest - SAVE_FREQ}"
    ) in faults["log"]
    assert faults["returncode"] == 1, faults["stderr"][-3000:]
    assert (
        f"the checkpoint of step {newest + SAVE_FREQ} could not be written (FileExistsError(17, 'File exists')); "
        f"the checkpoint of step {newest} is intact: fix the cause and run the same command to resume from it"
    ) in faults["stderr"]
    assert faults["checkpoint"] == newest  # the marker never moved to the failed write
    check_every_position_accounted_for_once(root / "killed", STEPS, BATCH)


def test_two_ranks_checkpoint_and_resume_with_two_ranks(runs):
    root, *_ = runs
    out = root / "killed"
    for step in range(SAVE_FREQ, STEPS + 1, SAVE_FREQ):
        shards = sorted(p.name for p in (out / "ckpt" / f"global_step_{step}" / "actor").glob("model_world_size_*"))
        assert shards == ["model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt"], (step, shards)
    for row in read_jsonl(out / "metrics.jsonl"):  # every step, before and after the kills, on both ranks
        assert row["npd/micro_batches"] == 2 * row["npd/micro_batches_per_rank"]


def test_the_resumed_run_ends_as_accurate_as_the_uninterrupted_one(runs):
    root, *_ = runs
    straight, killed = (read_jsonl(root / name / "metrics.jsonl")[-1][ACCURACY] for name in ("straight", "killed"))
    assert abs(killed - straight) <= ACCURACY_BAND, (killed, straight)


def test_a_resume_keeps_the_rows_up_to_its_checkpoint_and_drops_a_line_cut_by_a_kill(tmp_path):
    from verl_npd.trainer.summary import RunSummary

    rows = "".join(json.dumps({"step": s, "trained": [s]}) + "\n" for s in (1, 2, 3))
    (tmp_path / "positions.jsonl").write_text(rows + '{"step": 4, "trai')  # killed while writing step 4
    (tmp_path / "metrics.jsonl").write_text(rows)
    summary = RunSummary(output_dir=str(tmp_path), resume_step=2)
    summary.record_step(3, {"actor/loss": 0.5}, {"trained": [7], "dropped_stale": [], "filtered": [8]})
    summary.finish(steps_run=1, buffer_counters={}, interrupted=False, last_checkpoint_step=3, student_dir="")
    assert read_jsonl(tmp_path / "positions.jsonl") == [
        {"step": 1, "trained": [1]},
        {"step": 2, "trained": [2]},
        {"step": 3, "trained": [7], "dropped_stale": [], "filtered": [8]},
    ]
    assert [(row["step"], row.get("actor/loss")) for row in read_jsonl(tmp_path / "metrics.jsonl")] == [
        (1, None), (2, None), (3, 0.5)
    ]

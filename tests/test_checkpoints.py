"""Which checkpoint a resume takes: the manifest's sizes against what is on disk, written by hand
here; the end-to-end fallback (a truncated shard of a real run) is in test_resume_async."""

import json
import os

import pytest

from verl_npd.trainer.checkpoints import (
    MANIFEST,
    CheckpointError,
    checkpoint_problem,
    choose_checkpoint,
    earlier_checkpoints,
    write_manifest,
)


def make_checkpoint(root, step: int, files: dict[str, bytes]) -> str:
    step_dir = root / f"global_step_{step}"
    for relative, content in files.items():
        (step_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (step_dir / relative).write_bytes(content)
    write_manifest(str(step_dir))
    return str(step_dir)


FILES = {"actor/model_world_size_1_rank_0.pt": b"x" * 100, "npd/state.json": b"{}", "npd/buffer.json": b"[]"}


def test_the_manifest_lists_every_file_but_itself_with_its_size(tmp_path):
    step_dir = make_checkpoint(tmp_path, 4, FILES)
    with open(os.path.join(step_dir, MANIFEST)) as f:
        assert json.load(f) == {"actor/model_world_size_1_rank_0.pt": 100, "npd/buffer.json": 2, "npd/state.json": 2}
    assert checkpoint_problem(step_dir) is None


def test_a_torn_or_truncated_checkpoint_is_named(tmp_path):
    torn = tmp_path / "global_step_2" / "actor"
    torn.mkdir(parents=True)
    (torn / "model_world_size_1_rank_0.pt").write_bytes(b"x" * 10)
    assert checkpoint_problem(str(torn.parent)) == "npd/manifest.json is missing: the checkpoint was not finished"

    step_dir = make_checkpoint(tmp_path, 4, FILES)
    shard = os.path.join(step_dir, "actor", "model_world_size_1_rank_0.pt")
    os.truncate(shard, 60)
    assert checkpoint_problem(step_dir) == "actor/model_world_size_1_rank_0.pt has 60 bytes, 100 when it was written"
    os.remove(shard)
    assert checkpoint_problem(step_dir) == "actor/model_world_size_1_rank_0.pt is missing"


def test_a_resume_falls_back_to_the_newest_usable_checkpoint_and_says_why(tmp_path):
    for step in (2, 4, 6, 8):
        make_checkpoint(tmp_path, step, FILES)
    make_checkpoint(tmp_path, 10, FILES)  # beyond the "latest" marker (8): never a candidate
    os.truncate(tmp_path / "global_step_8" / "npd" / "state.json", 1)
    os.remove(tmp_path / "global_step_6" / MANIFEST)
    candidates = earlier_checkpoints(str(tmp_path / "global_step_8"))
    assert candidates == [str(tmp_path / f"global_step_{step}") for step in (8, 6, 4, 2)]
    chosen, skipped = choose_checkpoint(candidates)
    assert chosen == str(tmp_path / "global_step_4")
    assert skipped == [
        {"step": 8, "problem": "npd/state.json has 1 bytes, 2 when it was written"},
        {"step": 6, "problem": "npd/manifest.json is missing: the checkpoint was not finished"},
    ]


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    step_dir = make_checkpoint(tmp_path, 2, FILES)
    os.remove(os.path.join(step_dir, "npd", "buffer.json"))
    with pytest.raises(CheckpointError, match=r"no usable checkpoint to resume from in .* \(step 2: npd/buffer.json is missing\)"):
        choose_checkpoint(earlier_checkpoints(step_dir))


def test_the_summary_names_a_checkpoint_the_resume_skipped():
    from verl_npd.trainer.summary import format_summary

    result = {"steps": 4, "wall_time_s": 1.0, "student_dir": "/s",
              "unusable_checkpoints": [{"step": 8, "problem": "npd/manifest.json is missing: the checkpoint was not finished"}]}  # fmt: skip
    assert (
        "the checkpoint of step 8 was unusable (npd/manifest.json is missing: the checkpoint was not finished): "
        "resumed from an earlier one"
    ) in format_summary(result, "/out").splitlines()

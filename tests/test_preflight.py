"""A misconfigured ``main_npd`` run fails before any Ray actor starts, with one line naming the field."""

import re
import time

import pyarrow.parquet as pq
import pytest
from conftest import run_module

from tiny_models import build_tiny_qwen2, build_tiny_tokenizer


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["npd.buffer.max_staleness=-1"], "npd.buffer.max_staleness must be >= 0, got -1"),
        (["npd.filter.lo=0.9", "npd.filter.hi=0.1"], "npd.filter.lo (0.9) must not exceed npd.filter.hi (0.1)"),
        (["npd.sync_interval=0"], "npd.sync_interval must be >= 1, got 0"),
        (["npd.sync_interval=4", "npd.buffer.max_staleness=1"], "npd.sync_interval=4 with npd.buffer.max_staleness=1"),
        (["npd.packing.token_budget=0"], "npd.packing.token_budget must be >= 1"),
        (["+npd.no_such_field=1"], "npd: unknown field(s) ['no_such_field']"),
        (["actor_rollout_ref.model.path=/nonexistent/student"], "actor_rollout_ref.model.path: model directory"),
        (["ray_kwargs.ray_init.num_gpus=1"], "needs 2 logical GPUs (trainer 1 + teacher 1)"),
        (
            ["actor_rollout_ref.rollout.nnodes=1", "actor_rollout_ref.rollout.checkpoint_engine.backend=npd_gloo"],
            "needs 3 logical GPUs (trainer 1 + teacher 1 + standalone rollout 1)",
        ),
        (["actor_rollout_ref.rollout.nnodes=1"], "actor_rollout_ref.rollout.checkpoint_engine.backend=naive cannot"),
        (
            ["trainer.n_gpus_per_node=3", "ray_kwargs.ray_init.num_gpus=4"],
            "64 samples per step cannot be split evenly over the trainer's 3 data-parallel ranks",
        ),
        # The toy prompts are 15 or 17 tokens long.
        (
            ["data.max_prompt_length=16", "data.filter_overlong_prompts=false"],
            "prompts in '{train}' are longer than data.max_prompt_length=16 (first: row ",
        ),
        (["data.max_prompt_length=12"], "are longer than data.max_prompt_length=12: nothing is left"),
        (["data.train_files=/nonexistent.parquet"], "data.train_files: data file '/nonexistent.parquet' does not exist"),
    ],
)
def test_bad_config_fails_fast_naming_the_field(toy_world, overrides, expected):
    start = time.monotonic()
    result = run_module("verl_npd.main_npd", overrides, timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert expected.format(train=toy_world.train_parquet) in result.stderr
    assert "Traceback" not in result.stderr
    # No Ray cluster was started: its banner never appears, and no actor printed anything.
    assert "Started a local Ray instance" not in result.stdout + result.stderr
    assert elapsed < 120


def test_teacher_student_vocabulary_mismatch_prints_both_sizes(toy_world, tmp_path):
    other_student = tmp_path / "student"
    tokenizer = build_tiny_tokenizer(other_student)
    build_tiny_qwen2(other_student, vocab_size=len(tokenizer))
    result = run_module("verl_npd.main_npd", [f"actor_rollout_ref.model.path={other_student}"], timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "vocabularies differ" in line
    from transformers import AutoTokenizer

    teacher_size = len(AutoTokenizer.from_pretrained(toy_world.teacher_dir))
    student_size = len(AutoTokenizer.from_pretrained(str(other_student)))
    assert teacher_size != student_size
    assert f"teacher {teacher_size} tokens, student {student_size} tokens" in line


def test_overlong_prompts_are_counted_when_they_are_skipped(toy_world):
    # Filtering keeps the run going (it then stops at the resource check, before Ray).
    result = run_module(
        "verl_npd.main_npd", ["data.max_prompt_length=16", "ray_kwargs.ray_init.num_gpus=1"], timeout=120
    )
    assert result.returncode == 2, result.stderr[-2000:]
    val_rows = pq.read_table(toy_world.val_parquet).num_rows
    counted = re.search(r"data.val_files: (\d+) of (\d+) prompts .* are skipped \(data.filter_overlong_prompts=true\)",
                        result.stderr)
    assert counted, result.stderr[-2000:]
    assert 0 < int(counted.group(1)) < int(counted.group(2)) == val_rows


@pytest.mark.parametrize("problem", ["no rows", "no prompt column"])
def test_bad_dataset_is_named(toy_world, tmp_path, problem):
    table = pq.read_table(toy_world.train_parquet)
    table = table.slice(0, 0) if problem == "no rows" else table.drop(["prompt"])
    bad = tmp_path / "train.parquet"
    pq.write_table(table, bad)
    result = run_module("verl_npd.main_npd", [f"data.train_files={bad}"], timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"verl-npd: data.train_files: '{bad}' has {problem}"), line

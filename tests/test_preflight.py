"""A misconfigured ``main_npd`` run fails before any Ray actor starts, with one line naming the field."""

import time

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
        (["ray_kwargs.ray_init.num_gpus=1"], "needs 2 logical GPUs"),
    ],
)
def test_bad_config_fails_fast_naming_the_field(toy_world, overrides, expected):
    start = time.monotonic()
    result = run_module("verl_npd.main_npd", overrides, timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert expected in result.stderr
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

"""Which checkpoint a run resumes from.

A checkpoint (``global_step_N``: verl's actor files, then NPD's buffer and stream state) is complete
when its manifest, written after every other part and before the "latest" marker, lists each of
its files with the size it was written with. A checkpoint torn by a crash or a full disk, or
truncated afterwards, is told apart from a usable one by sizes alone, without unpickling anything.
A resume whose newest checkpoint is unusable falls back to the newest usable one before it, and
says which it skipped and why.

Sizes do not catch bytes changed in place (a same-size corruption); verl's loaders find those.
The manifest lists the files this process sees: on several nodes without a shared file system, the
files other nodes wrote are not in it (verl's checkpoints assume a shared one, or HDFS).
"""

from __future__ import annotations

import json
import os
import re

from verl_npd.trainer.summary import write_text_atomically

MANIFEST = os.path.join("npd", "manifest.json")
STEP_DIR = re.compile(r"global_step_(\d+)\Z")


class CheckpointError(RuntimeError):
    """No checkpoint to resume from is usable, or one could not be written."""


def write_manifest(step_dir: str) -> None:
    """Record the size of every file of the checkpoint; the last part of a checkpoint written."""
    sizes = {}
    for root, _, names in os.walk(step_dir):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, step_dir)
            if relative != MANIFEST:
                sizes[relative] = os.path.getsize(path)
    write_text_atomically(os.path.join(step_dir, MANIFEST), json.dumps(sizes, indent=0, sort_keys=True))


def checkpoint_problem(step_dir: str) -> str | None:
    """What makes ``step_dir`` unusable, or None when every file it was written with is there at
    its size."""
    manifest = os.path.join(step_dir, MANIFEST)
    if not os.path.isfile(manifest):
        return f"{MANIFEST} is missing: the checkpoint was not finished"
    try:
        with open(manifest) as f:
            sizes = json.load(f)
    except ValueError as e:
        return f"{MANIFEST} is unreadable ({e})"
    for relative, size in sorted(sizes.items()):
        path = os.path.join(step_dir, relative)
        if not os.path.isfile(path):
            return f"{relative} is missing"
        actual = os.path.getsize(path)
        if actual != size:
            return f"{relative} has {actual} bytes, {size} when it was written"
    return None


def step_of(step_dir: str) -> int:
    match = STEP_DIR.match(os.path.basename(os.path.normpath(step_dir)))
    if match is None:
        raise ValueError(f"{step_dir} is not a checkpoint directory (global_step_N)")
    return int(match.group(1))


def earlier_checkpoints(step_dir: str) -> list[str]:
    """``step_dir`` and the checkpoints of earlier steps beside it, newest first."""
    root, newest = os.path.dirname(os.path.normpath(step_dir)), step_of(step_dir)
    steps = [int(m.group(1)) for m in map(STEP_DIR.match, os.listdir(root)) if m and int(m.group(1)) < newest]
    return [step_dir] + [os.path.join(root, f"global_step_{step}") for step in sorted(steps, reverse=True)]


def choose_checkpoint(candidates: list[str]) -> tuple[str, list[dict]]:
    """The first usable checkpoint of ``candidates`` (newest first), and those skipped before it as
    ``{"step", "problem"}``. Raises CheckpointError naming every problem when none is usable: a
    run never silently starts over."""
    skipped = []
    for step_dir in candidates:
        problem = checkpoint_problem(step_dir)
        if problem is None:
            return step_dir, skipped
        skipped.append({"step": step_of(step_dir), "problem": problem})
    found = "; ".join(f"step {s['step']}: {s['problem']}" for s in skipped)
    raise CheckpointError(
        f"no usable checkpoint to resume from in {os.path.dirname(os.path.normpath(candidates[0]))} ({found}); "
        "move the directory away to start over, or set trainer.resume_mode=disable"
    )

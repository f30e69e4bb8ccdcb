"""Shared fixtures: the toy world (built once per machine, cached) and runners for the two entry
points (verl's main_ppo and our main_npd) as real subprocesses with real Ray."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small and fast main_npd runs: 16 prompts per step, validation on 64 prompts.
FAST = ["data.train_batch_size=16", "data.val_max_samples=64", "trainer.logger=[console]"]


@pytest.fixture(scope="session")
def toy_world():
    from verl_npd.toy import ensure_toy_world

    return ensure_toy_world(quiet=True)


def run_module(module: str, args: list[str], timeout: float = 900, env: dict | None = None):
    """Run ``python -m module args`` from the repo root; return the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

"""Shared fixtures: the toy world (built once per machine, cached) and runners for the two entry
points (verl's main_ppo and our main_npd) as real subprocesses with real Ray."""

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The toy demo, main_npd's default config.
TOY_CONFIG = ("verl_npd/config", "npd_toy")

# Small and fast main_npd runs: 16 prompts per step, validation on 64 prompts.
FAST = ["data.train_batch_size=16", "data.val_max_samples=64", "trainer.logger=[console]"]


@pytest.fixture(scope="session")
def toy_world():
    from verl_npd.toy import ensure_toy_world

    return ensure_toy_world(quiet=True)


def compose(folder: str, name: str, overrides=()):
    """Compose a config (``folder`` absolute or relative to the repo) as main_npd does: with the ``npd:``
    section's defaults in Hydra's store and the toy's ``${npd_toy:...}`` resolvers registered."""
    import verl  # noqa: F401  (the plugin: our loss modes, engines and patches, for verl's checks)
    from hydra import compose as hydra_compose, initialize_config_dir

    from verl_npd.toy.resolvers import register
    from verl_npd.trainer.config import store_npd_defaults

    store_npd_defaults()
    register()
    with initialize_config_dir(config_dir=os.path.join(REPO, folder), version_base=None):
        return hydra_compose(config_name=name, overrides=list(overrides))


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


def run_on_policy(
    out, extra_args: list[str], timeout: float = 900, env: dict | None = None, steps: int = 4
) -> list[dict]:
    """``steps`` small ``main_npd`` steps with a weight sync after each and no staleness allowed.

    Checks that the run exits 0 and that every sample of step t was generated, per the rollout
    server's own report, by the weights of version t-1: the ones being trained. Returns the rows of
    ``metrics.jsonl``.
    """
    on_policy = [f"trainer.total_training_steps={steps}", "npd.sync_interval=1", "npd.buffer.max_staleness=0"]
    result = run_module("verl_npd.main_npd", [*FAST, f"npd.output_dir={out}", *on_policy, *extra_args], timeout, env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    history = read_jsonl(out / "metrics.jsonl")
    assert [row["step"] for row in history] == list(range(1, steps + 1))
    for row in history:
        assert row["npd/behaviour_version_min"] == row["npd/behaviour_version_max"] == row["step"] - 1
        assert row["npd/staleness_max"] == 0
        assert row["timing/sync"] > 0
    return history


def start_npd(args: list[str], log_path) -> subprocess.Popen:
    """main_npd in its own session, its output in ``log_path`` (a pipe nobody reads could fill)."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "verl_npd.main_npd", *args],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def tail(log_path) -> str:
    return log_path.read_text()[-3000:]


def wait_for(condition, process: subprocess.Popen, log_path, what: str, timeout: float = 900, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}: {tail(log_path)}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll_s)


def steps_logged(out) -> int:
    path = out / "metrics.jsonl"
    return len(read_jsonl(path)) if path.exists() else 0


def kill_session(process: subprocess.Popen, timeout: float = 60) -> None:
    """SIGKILL the driver and every process of its session (as a node failure would): Ray's GCS,
    raylet and workers stay in the driver's session (workers in process groups of their own, out of
    reach of a killpg). Returns once none is left."""

    def session() -> list[psutil.Process]:
        members = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == process.pid and p.status() != psutil.STATUS_ZOMBIE:
                    members.append(p)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        return members

    deadline = time.monotonic() + timeout
    while members := session():
        for member in members:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
        assert time.monotonic() < deadline, f"still running after SIGKILL: {members}"
        time.sleep(0.2)
    process.wait(timeout=timeout)

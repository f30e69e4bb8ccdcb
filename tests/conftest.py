"""Shared fixtures: the toy world (built once per machine, cached) and runners for the two entry
points (verl's main_ppo and our main_npd) as real subprocesses with real Ray."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter

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


def run_main_npd_cases(cases: list[list[str]], tmp_dir, timeout: float = 600) -> tuple[list[dict], str]:
    """``main_npd`` once per case (a list of arguments), all in one fresh process
    (``tests/main_npd_cases.py``): per case its exit code, stdout, stderr, seconds and whether Ray
    was started; and what reached the process's own stdout and stderr (a logging handler made
    before a case redirected them writes there)."""
    cases_path, results_path = os.path.join(tmp_dir, "cases.json"), os.path.join(tmp_dir, "results.json")
    with open(cases_path, "w") as f:
        json.dump(cases, f)
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "main_npd_cases.py"), cases_path, results_path],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(results_path) as f:
        return json.load(f), result.stdout + result.stderr


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


def start_npd(args: list[str], log_path, env: dict | None = None) -> subprocess.Popen:
    """main_npd in its own session, its output in ``log_path`` (a pipe nobody reads could fill)."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "verl_npd.main_npd", *args],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
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


def checkpoint_state(out, step: int) -> tuple[dict, list[int]]:
    """A checkpoint's npd state and the stream positions of the samples queued in it."""
    state_dir = out / "ckpt" / f"global_step_{step}" / "npd"
    state = json.loads((state_dir / "state.json").read_text())
    queued = [record["prompt"]["position"] for record in json.loads((state_dir / "buffer.json").read_text())]
    return state, queued


def check_every_position_accounted_for_once(out, steps: int, batch: int) -> None:
    """positions.jsonl plus the final checkpoint (of step ``steps``, ``batch`` prompts a step, one
    sample each) cover the prompt stream exactly, and the buffer's counters in that checkpoint agree
    with them."""
    rows = read_jsonl(out / "positions.jsonl")
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    assert all(len(row["trained"]) == batch for row in rows)
    state, queued = checkpoint_state(out, steps)
    stream, counters = state["stream"], state["buffer"]["counters"]
    trained = [p for row in rows for p in row["trained"]]
    # The filter's drops since the last row are recorded in the checkpoint, as are queued samples
    # and the prompts in flight (re-issued by a resume).
    filtered = [p for row in rows for p in row["filtered"]] + stream["filtered"]
    dropped = [p for row in rows for p in row["dropped_stale"]]
    accounted = Counter(trained + filtered + dropped + queued + stream["reissue"])
    missing = sorted(set(range(stream["cursor"])) - set(accounted))
    twice = {p: n for p, n in accounted.items() if n > 1}
    assert not missing and not twice and max(accounted) < stream["cursor"], (missing, twice)
    # The buffer's accounting: generated = filtered + dropped as stale + trained + queued, and
    # every position issued was generated or is in flight (one sample per prompt, none released).
    assert counters["consumed"] == len(trained) == steps * batch
    assert counters["filtered"] == len(filtered)
    assert counters["dropped_stale"] == len(dropped)
    assert counters["generated"] == len(filtered) + len(dropped) + len(trained) + len(queued)
    assert counters["released"] == 0
    assert counters["reserved"] == counters["generated"] + len(stream["reissue"]) == stream["cursor"]
    history = read_jsonl(out / "metrics.jsonl")
    assert [row["step"] for row in history] == list(range(1, steps + 1))
    assert sum(row["npd/dropped_stale"] for row in history) == len(dropped)


RAY = os.path.join(os.path.dirname(sys.executable), "ray")
# Explicit, so that a token in ~/.ray (Ray writes one for every new local cluster) plays no part.
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_cluster(nodes: list[tuple[int, int]]):
    """Start one Ray node per ``(cpus, gpus)`` on this machine, the first as head; yield the head's
    address and its dashboard's URL (Ray's state API reads actors and tasks through it). Each
    ``ray start --block`` stays in the foreground, so that teardown stops exactly the nodes started
    here (SIGTERM: a node drains and stops its own processes)."""
    from ray._private.services import get_node_ip_address

    env = {**os.environ, **RAY_ENV}
    address = f"{get_node_ip_address()}:{free_port()}"
    dashboard_port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live under it
    started: list[subprocess.Popen] = []
    try:
        for index, (cpus, gpus) in enumerate(nodes):
            role = (
                ["--head", f"--port={address.rsplit(':', 1)[1]}", f"--temp-dir={temp_dir}",
                 "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                 f"--ray-client-server-port={free_port()}"]
                if index == 0
                else [f"--address={address}"]
            )
            # Two nodes on one machine: every per-node agent needs a port of its own.
            ports = [f"--{name}={free_port()}" for name in (
                "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                "metrics-export-port", "node-manager-port", "object-manager-port",
            )]
            started.append(subprocess.Popen(
                [RAY, "start", "--block", "--disable-usage-stats", f"--num-cpus={cpus}", f"--num-gpus={gpus}",
                 *role, *ports],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
            wait_for_nodes(address, index + 1, started)
        yield address, f"http://127.0.0.1:{dashboard_port}"
    finally:
        for node in reversed(started):
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(timeout=120)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_nodes(address: str, count: int, started: list[subprocess.Popen], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert all(node.poll() is None for node in started), "a ray node exited while starting"
        status = subprocess.run([RAY, "status", f"--address={address}"], capture_output=True, text=True,
                                env={**os.environ, **RAY_ENV})
        if status.returncode == 0 and status.stdout.count(" node_") >= count:
            return
        assert time.monotonic() < deadline, f"{count} ray node(s) not up after {timeout:.0f}s: {status.stdout}"
        time.sleep(2)

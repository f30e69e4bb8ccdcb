"""Runs the methods one after the other, each seed of each as its own process (its own Ray cluster),
with a progress bar per run, then writes the results."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator

from tqdm.auto import tqdm

from verl_npd.bench import readers, report
from verl_npd.bench.methods import (
    Command,
    Method,
    free_port,
    method_command,
    run_overrides,
    served_teacher_command,
    sft_command,
)
from verl_npd.bench.settings import REPO_ROOT, Recipe, Scale
from verl_npd.platform.cpu_threads import share_cores


def _start(command: Command, log_path: str) -> subprocess.Popen:
    """``command`` from the repo root, in a process group of its own, its output in ``log_path``."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            command.argv,
            cwd=REPO_ROOT,
            env={**os.environ, **command.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def run_command(command: Command, log_path: str, total_steps: int | None, desc: str) -> tuple[int, float]:
    """Run ``command`` from the repo root with its output in ``log_path``; a progress bar follows the
    steps it records. Returns (exit code, wall seconds). Ctrl-C stops it with its whole process group
    (the method's Ray cluster included)."""
    start = time.perf_counter()
    process = _start(command, log_path)
    # disable=None: no bar when the output is not a terminal (logs get the start/end lines only).
    bar = tqdm(total=total_steps, desc=desc, unit="step", disable=None)
    try:
        while process.poll() is None:
            time.sleep(1.0)
            if not bar.disable:
                bar.update(readers.steps_done(command.steps_file) - bar.n)
    except KeyboardInterrupt:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    finally:
        bar.close()
    return process.returncode, time.perf_counter() - start


@contextlib.contextmanager
def serving(command: Command, port: int, log_path: str, timeout_s: float = 300.0) -> Iterator[tuple[str, float]]:
    """Start the server of ``command`` (output in ``log_path``) and wait until it answers
    ``GET /health`` on ``port``; yield its ``/v1`` URL and the seconds that took. The server is
    stopped (its process group, SIGTERM then SIGKILL) however the block ends."""
    start = time.perf_counter()
    process = _start(command, log_path)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server at {base} exited with {process.returncode}:\n{_log_tail(log_path)}")
            if time.perf_counter() - start > timeout_s:
                raise RuntimeError(f"the server at {base} did not answer in {timeout_s:.0f} s:\n{_log_tail(log_path)}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        yield f"{base}/v1", time.perf_counter() - start
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _log_tail(path: str, lines: int = 20) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


class Benchmark:
    def __init__(self, recipe: Recipe, scale: Scale, methods: list[Method], out_dir: str):
        self.recipe, self.scale, self.methods = recipe, scale, methods
        self.out_dir = os.path.abspath(out_dir)
        self.data_dir = os.path.join(self.out_dir, "data")
        self.val_files: str | None = None
        self.teacher_accuracy: float | None = None

    def run(self) -> dict:
        """Every method once per seed; seed after seed, so that a drift of the machine over the
        benchmark's time falls on every method alike."""
        os.makedirs(self.data_dir, exist_ok=True)
        if self.recipe.toy:
            self.share_cores()
            self._prepare_toy()
        methods = {m.name: {"label": m.label, "runs": []} for m in self.methods}
        for m in self.methods:
            shutil.rmtree(os.path.join(self.out_dir, m.name), ignore_errors=True)  # NPD appends: start clean
            if m.runner == "sft" and not self.recipe.toy:
                error = "SFT data is made from the toy teacher; GPU recipes have no SFT run"
                methods[m.name].update(status="skipped", error=error)
            if m.served_teacher and not self.recipe.toy:
                error = (
                    "the benchmark serves the toy teacher with python -m verl_npd.serve; on GPUs serve the "
                    "recipe's teacher with vLLM and give its URL as npd.teacher.url (README)"
                )
                methods[m.name].update(status="skipped", error=error)
        runnable = [m for m in self.methods if methods[m.name].get("status") != "skipped"]
        plan = [(seed, m) for seed in self.scale.seed_values for m in runnable]
        for index, (seed, method) in enumerate(plan, 1):
            tag = f"[{index}/{len(plan)}] {method.name} seed {seed}"
            print(f"\n{tag}: {method.label}", flush=True)
            run = self._run_method(method, seed, tag)
            methods[method.name]["runs"].append(run)
            print(f"{tag}: {run['status']} in {run['process_wall_s']:.0f} s", flush=True)
        results = report.build_results(self._settings(), self.teacher_accuracy, methods)
        markdown = report.write_results(results, self.out_dir)
        print("\n" + markdown)
        print(f"written to {self.out_dir}/results.json, results.md and the PNGs")
        return results

    def _settings(self) -> dict:
        scale = self.scale
        return {
            "recipe": "toy_cpu" if self.recipe.toy else self.recipe.npd_config_dir,
            "steps": scale.steps if scale.steps is not None else "recipe default",
            "train_batch_size": scale.train_batch_size or "recipe default",
            "validation prompts": scale.val_size or "all",
            "validation every": f"{scale.test_freq} steps" if scale.test_freq else "recipe default",
            "seeds": scale.seed_values,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        }

    def share_cores(self) -> None:
        """Every method's processes inherit the same share of the cores (verl_npd/platform/cpu_threads.py):
        the NPD config's, which counts a teacher replica, so a served teacher's process gets the
        share a replica would."""
        share_cores(self._npd_config(self.scale.seed_values[0]))

    # ---- the toy world's own data -------------------------------------------------------------

    def _npd_config(self, seed: int):
        """The NPD config with the benchmark's scale and seed: what SFT copies its settings from."""
        import verl  # noqa: F401  (loads the verl-npd plugin)
        from hydra import compose, initialize_config_dir

        from verl_npd.toy.resolvers import register
        from verl_npd.trainer.config import store_npd_defaults

        store_npd_defaults()
        register()

        with initialize_config_dir(config_dir=self.recipe.npd_config_dir, version_base=None):
            return compose(
                config_name=self.recipe.npd_config_name,
                overrides=run_overrides("npd", self.scale, self.val_files, seed),
            )

    def _prepare_toy(self) -> None:
        from verl_npd.bench import toy_data
        from verl_npd.toy import ensure_toy_world

        print("preparing the toy world, the validation set and the teacher's accuracy on it", flush=True)
        world = ensure_toy_world()
        self.val_files = toy_data.validation_subset(world.val_parquet, self.scale.val_size, self.data_dir)
        self.teacher_accuracy = toy_data.model_accuracy(world.teacher_dir, self.val_files)
        print(f"teacher accuracy {self.teacher_accuracy:.3f} on {self.val_files}", flush=True)

    # ---- one method, one seed ----------------------------------------------------------------

    def _run_method(self, method: Method, seed: int, desc: str) -> dict:
        run_dir = os.path.join(self.out_dir, method.name, f"seed{seed}")
        os.makedirs(run_dir)
        log_path = os.path.join(run_dir, "run.log")
        result = {"seed": seed, "log": os.path.relpath(log_path, self.out_dir)}
        if method.runner == "sft":
            return {**result, **self._run_sft(seed, run_dir, log_path, desc)}
        if method.served_teacher:
            return {**result, **self._run_with_served_teacher(method, seed, run_dir, log_path, desc)}
        command = method_command(method, self.recipe, self.scale, self.val_files, seed, run_dir)
        returncode, wall = run_command(command, log_path, self.scale.steps, desc)
        read = readers.read_npd if method.runner == "npd" else readers.read_verl
        return {**result, **self._outcome(returncode, wall, log_path, lambda: read(run_dir))}

    @contextlib.contextmanager
    def served_teacher(self, seed: int, run_dir: str) -> Iterator[tuple[str, float]]:
        """The NPD config's teacher behind ``python -m verl_npd.serve`` on a free loopback port, its
        output in ``run_dir/teacher_server.log``: yields its URL and its start-up seconds."""
        teacher_dir = self._npd_config(seed).distillation.teacher_models.teacher_model.model_path
        port = free_port()
        log_path = os.path.join(run_dir, "teacher_server.log")
        with serving(served_teacher_command(teacher_dir, port), port, log_path) as served:
            yield served

    def _run_with_served_teacher(self, method: Method, seed: int, run_dir: str, log_path: str, desc: str) -> dict:
        """Process wall: the served teacher's start-up (a teacher replica's is inside the job's
        process wall), then the job's. Training time leaves both out, as it does all set-up."""
        try:
            with self.served_teacher(seed, run_dir) as (url, start_s):
                print(f"teacher served at {url} (started in {start_s:.0f} s)", flush=True)
                command = method_command(method, self.recipe, self.scale, self.val_files, seed, run_dir, url)
                returncode, wall = run_command(command, log_path, self.scale.steps, desc)
        except RuntimeError as e:
            return {"returncode": None, "process_wall_s": 0.0, "status": "failed", "error": str(e)}
        outcome = self._outcome(returncode, start_s + wall, log_path, lambda: readers.read_npd(run_dir))
        return {**outcome, "teacher_server_start_s": start_s}

    def _run_sft(self, seed: int, run_dir: str, log_path: str, desc: str) -> dict:
        """Process wall: the teacher's generation (as recorded when it was made), the SFT process and
        the evaluation of its checkpoints."""
        from verl_npd.bench import toy_data

        config = self._npd_config(seed)
        n_prompts = config.npd.total_steps * config.data.train_batch_size
        print(f"teacher responses for {n_prompts} training prompts (made once per seed, then cached)", flush=True)
        teacher_dir = config.distillation.teacher_models.teacher_model.model_path
        responses, generation_s = toy_data.teacher_responses(
            teacher_dir, config.data.train_files, n_prompts, seed, self.data_dir
        )
        command = sft_command(config, responses, run_dir)
        returncode, wall = run_command(command, log_path, config.npd.total_steps, desc)
        if returncode == 0:
            print("evaluating the SFT checkpoints", flush=True)
            start = time.perf_counter()
            toy_data.evaluate_sft_run(run_dir, config.actor_rollout_ref.model.path, self.val_files)
            wall += time.perf_counter() - start
        outcome = self._outcome(
            returncode, generation_s + wall, log_path, lambda: readers.read_sft(run_dir, generation_s)
        )
        return {**outcome, "teacher_generation_s": generation_s}

    @staticmethod
    def _outcome(returncode: int, wall: float, log_path: str, read) -> dict:
        outcome = {"returncode": returncode, "process_wall_s": wall}
        if returncode != 0:
            return {**outcome, "status": "failed", "error": _log_tail(log_path)}
        run = read()
        if not run.curve:
            return {**outcome, "status": "failed", "error": "the run recorded no validation accuracy"}
        return {**outcome, "status": "ok", **run.as_dict()}

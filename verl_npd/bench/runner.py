"""Runs the methods one after the other, each seed of each as its own process (its own Ray cluster),
with a progress bar per run, then writes the results."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import site
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from functools import partial

from tqdm.auto import tqdm

from verl_npd.bench import readers, report
from verl_npd.bench.methods import (
    CROSS_TEACHER_OVERRIDES,
    Command,
    Method,
    free_port,
    method_command,
    run_overrides,
    served_teacher_command,
    sft_command,
)
from verl_npd.bench.settings import REPO_ROOT, Recipe, Scale
from verl_npd.platform.cpu_threads import OMP_WAIT_POLICY_ENV, compute_processes_per_node, node_cores


def _start(command: Command, log_path: str) -> subprocess.Popen:
    """``command`` in the folder of ``log_path`` (its run's folder; every path a command names is
    absolute), in a process group of its own, its output in ``log_path``."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            command.argv,
            cwd=os.path.dirname(os.path.abspath(log_path)),
            env=child_environment(command.env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def child_environment(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment with ``extra``, in which a child imports the verl_npd this process
    runs: one that is not installed in a site directory (a checkout, found through the current
    directory or PYTHONPATH; an editable install) has its folder put first on PYTHONPATH, since the
    child runs elsewhere."""
    env = {**os.environ, **extra}
    if REPO_ROOT not in {os.path.abspath(path) for path in site.getsitepackages()}:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    return env


def run_command(command: Command, log_path: str, total_steps: int | None, desc: str) -> tuple[int, float]:
    """Run ``command`` with its output in ``log_path``; a progress bar follows the
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


def source_state(out_dir: str) -> dict:
    """The commit the benchmark's code came from and whether the checkout had local changes
    (tracked or untracked files, outside ``out_dir``), so that results say which code made them.
    An installed package has neither: its folder is no checkout's root (one that lies inside a
    checkout, a venv in a repository, is not that checkout's code)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout

    try:
        top_level = git("rev-parse", "--show-toplevel").strip()
        commit = git("rev-parse", "HEAD").strip()
        status = git("status", "--porcelain", "--untracked-files=all")
    except (OSError, subprocess.CalledProcessError):
        top_level = None
    if top_level is None or not os.path.samefile(top_level, REPO_ROOT):
        return {"commit": None, "local_changes": None, "note": f"{REPO_ROOT} is not a git checkout"}
    out = os.path.relpath(os.path.abspath(out_dir), REPO_ROOT)
    changed = [line[3:] for line in status.splitlines() if not line[3:].startswith(out + os.sep)]
    code = git("rev-parse", *(f"HEAD:{path}" for path in CODE_PATHS)).split()
    return {
        "commit": commit,
        "local_changes": bool(changed),
        "changed_files": changed[:20],
        "code": dict(zip(CODE_PATHS, code)),
    }


# What a run executes: the package, the recipes it composes and the pinned dependencies. A later commit
# whose git trees of these are the same ran the same code (docs-only commits, such as a benchmark's
# partial results, leave them alone), so a resumed benchmark may go on from it.
CODE_PATHS = ("verl_npd", "recipes", "setup.py")


def resume_problem(previous: dict, settings: dict, methods: list[str], teacher_accuracy: float | None) -> str | None:
    """Why the benchmark whose results are ``previous`` cannot be continued by one with ``settings``
    (its source state included) and ``methods``, or None when it can."""
    before = previous["settings"]
    if not before.get("code"):
        return "its results.json does not record its code's git trees (it predates --resume)"
    for name, source in (("its results", before), ("this checkout", settings)):
        if source.get("local_changes") is not False:
            return f"{name} came from a tree with local changes ({', '.join(source.get('changed_files', []))})"
    if before["code"] != settings["code"]:
        differ = [path for path in CODE_PATHS if before["code"].get(path) != settings["code"][path]]
        return f"the code changed since commit {before['commit'][:12]} ({', '.join(differ)} differ)"
    for key, value in settings.items():
        if key not in RUN_SPECIFIC and before.get(key) != value:
            return f"its {key} was {before.get(key)!r}, this run's is {value!r}"
    if list(previous["methods"]) != methods:
        return f"it ran the methods {list(previous['methods'])}, this run's are {methods}"
    if previous["teacher_accuracy"] != teacher_accuracy:
        return f"its teacher accuracy was {previous['teacher_accuracy']}, now {teacher_accuracy}"
    return None


class CannotResume(Exception):
    """The benchmark in the output folder cannot be continued; the message says why."""


# Settings that may differ between the parts of a resumed benchmark: the commit may be a docs-only
# descendant, the machine may be another of the same kind; each part records its own.
RUN_SPECIFIC = ("commit", "machine", "runs completed", "earlier parts")


def reference_results_dir(out_dir: str) -> bool:
    """Whether ``out_dir`` is under the checkout's docs/benchmarks, where committed results live."""
    docs = os.path.join(REPO_ROOT, "docs", "benchmarks")
    return os.path.commonpath([os.path.abspath(out_dir), docs]) == docs


class Benchmark:
    def __init__(
        self,
        recipe: Recipe,
        scale: Scale,
        methods: list[Method],
        out_dir: str,
        threads: str | list[int] | None = None,
        trial_steps: int = 20,
        teacher_accuracy: float | None = None,
        resume: bool = False,
    ):
        """``threads``, torch threads per process: None, the default share for every method; one
        number, that for every method; several, each method is tried with each before its seeds run
        (``trial_steps`` steps) and keeps the fastest; "auto", those of the default share and of
        every core. ``resume``: go on with the benchmark whose results are in ``out_dir``, keeping
        its thread trials and finished runs, if it ran the same code with the same settings."""
        self.recipe, self.scale, self.methods = recipe, scale, methods
        self.out_dir = os.path.abspath(out_dir)
        self.data_dir = os.path.join(self.out_dir, "data")
        self.val_files: str | None = None
        self.teacher_accuracy = teacher_accuracy
        self.threads = threads
        self.trial_steps = trial_steps
        self.resume = resume

    def run(self) -> dict:
        """Every method once per seed; seed after seed, so that a drift of the machine over the
        benchmark's time falls on every method alike."""
        source = source_state(self.out_dir)
        os.makedirs(self.data_dir, exist_ok=True)
        if self.recipe.toy:
            os.environ.setdefault(OMP_WAIT_POLICY_ENV, "PASSIVE")
            self._prepare_toy()
        splits = self._thread_splits()
        settings = {**self._settings(), **source}
        methods = {
            m.name: {"label": m.label, "opd_mode": m.opd_mode, "runs": [], "threads": splits[0] if splits else None}
            for m in self.methods
        }
        for m in self.methods:
            skipped = self._why_skipped(m)
            if skipped:
                methods[m.name].update(status="skipped", error=skipped)
        runnable = [m for m in self.methods if methods[m.name].get("status") != "skipped"]
        if self.resume:
            trials, done = self._resumed(settings, methods)
        else:
            for m in self.methods:
                shutil.rmtree(os.path.join(self.out_dir, m.name), ignore_errors=True)  # NPD appends: start clean
            trials = self._thread_trials(runnable, splits) if len(splits) > 1 else {}
            done = 0
        for name, tried in trials.items():
            fastest = min((t for t in tried if t["status"] == "ok"), key=lambda t: t["train_s_per_step"], default=None)
            if fastest is not None:
                methods[name]["threads"] = fastest["threads"]
        ran = {(run["seed"], name) for name, m in methods.items() for run in m["runs"]}
        plan = [(seed, m) for seed in self.scale.seed_values for m in runnable if (seed, m.name) not in ran]
        total = done + len(plan)
        results = self._write({**settings, "runs completed": f"{done} of {total}"}, methods, trials) if not plan else {}
        for index, (seed, method) in enumerate(plan, done + 1):
            tag = f"[{index}/{total}] {method.name} seed {seed}"
            threads = methods[method.name]["threads"]
            print(f"\n{tag}: {method.label}, {threads or 'the default'} threads per process", flush=True)
            run_dir = os.path.join(self.out_dir, method.name, f"seed{seed}")
            shutil.rmtree(run_dir, ignore_errors=True)  # what a stopped benchmark left of this run
            run = self._run_method(method, seed, tag, run_dir, threads)
            methods[method.name]["runs"].append(run)
            print(f"{tag}: {run['status']} in {run['process_wall_s']:.0f} s", flush=True)
            # Written after every run, so that a benchmark stopped midway leaves what it measured,
            # saying how much of the plan that is.
            results = self._write({**settings, "runs completed": f"{index} of {total}"}, methods, trials)
        print("\n" + report.format_markdown(results))
        print(f"written to {self.out_dir}/results.json, results.md and the PNGs")
        return results

    def _resumed(self, settings: dict, methods: dict[str, dict]) -> tuple[dict[str, list[dict]], int]:
        """The earlier benchmark's thread trials and runs, taken into ``methods`` (each method's kept
        split included), and how many runs it finished; ``settings`` gains its part's provenance.
        Refuses (CannotResume, naming why) to go on from other code or other settings."""
        path = os.path.join(self.out_dir, "results.json")
        if not os.path.exists(path):
            raise CannotResume(f"--resume: there is no {path} to go on from")
        with open(path) as f:
            previous = json.load(f)
        problem = resume_problem(previous, settings, list(methods), self.teacher_accuracy)
        if problem:
            raise CannotResume(f"--resume: {path} cannot be continued: {problem}")
        before = previous["settings"]
        part = {key: before[key] for key in ("commit", "machine", "runs completed")}
        settings["earlier parts"] = [*before.get("earlier parts", []), part]
        for name, method in previous["methods"].items():
            if method.get("status") != "skipped":
                methods[name].update(runs=method["runs"], threads=method["threads"])
        done = sum(len(m["runs"]) for m in methods.values())
        print(f"resuming: {done} runs and the thread trials kept from commit {before['commit'][:12]}", flush=True)
        return previous.get("thread_trials", {}), done

    def _write(self, settings: dict, methods: dict[str, dict], trials: dict[str, list[dict]]) -> dict:
        """results.{json,md} and the plots of the methods that have run so far."""
        ran = {name: m for name, m in methods.items() if m.get("status") == "skipped" or m["runs"]}
        results = report.build_results(settings, self.teacher_accuracy, ran)
        if trials:
            results["thread_trials"] = trials
        report.write_results(results, self.out_dir)
        return results

    def _why_skipped(self, method: Method) -> str | None:
        if method.runner == "sft" and not self.recipe.toy:
            return "SFT data is made from the toy teacher; GPU recipes have no SFT run"
        if method.cross_teacher and not self.recipe.toy:
            return "the cross-tokenizer teacher is the toy's (verl_npd/toy/cross.py); give a GPU recipe's NPD another teacher with npd.cross_tokenizer.enabled=true"
        if method.served_teacher and not self.recipe.toy:
            return (
                "the benchmark serves the toy teacher with python -m verl_npd.serve; on GPUs serve the "
                "recipe's teacher with vLLM and give its URL as npd.teacher.url (README)"
            )
        if method.runner == "verl" and not self.recipe.has_opd_config(method.opd_config):
            return f"the recipe has no config/{method.opd_config}.yaml"
        return None

    def _settings(self) -> dict:
        scale = self.scale
        return {
            "recipe": "toy_cpu" if self.recipe.toy else self.recipe.npd_config_dir,
            "steps": scale.steps if scale.steps is not None else "recipe default",
            "train_batch_size": scale.train_batch_size or "recipe default",
            "validation prompts": scale.val_size or "all",
            "validation every": f"{scale.test_freq} steps" if scale.test_freq else "recipe default",
            "seeds": scale.seed_values,
            "threads per process": self._thread_splits() or "the default share",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        }

    def _thread_splits(self) -> list[int]:
        """The torch threads per process to run (one) or try (several); none: each entry point's own
        default share."""
        if self.threads is None:
            return []
        if self.threads == "auto":
            if not self.recipe.toy:
                return []
            # The share main_npd gives each process of the NPD config (counting a teacher replica, so a
            # served teacher gets a replica's share), and every core.
            share = max(1, node_cores() // compute_processes_per_node(self._npd_config(self.scale.seed_values[0])))
            return sorted({share, node_cores()})
        return list(self.threads)

    # ---- thread trials ------------------------------------------------------------------------

    def _thread_trials(self, methods: list[Method], splits: list[int]) -> dict[str, list[dict]]:
        """Each method, seed 1, ``trial_steps`` steps without validation, once per thread split:
        its training wall-clock per step."""
        trials: dict[str, list[dict]] = {}
        plan = [(m, threads) for m in methods for threads in splits]
        for index, (method, threads) in enumerate(plan, 1):
            tag = f"[trial {index}/{len(plan)}] {method.name}, {threads} threads per process"
            print(f"\n{tag}", flush=True)
            run_dir = os.path.join(self.out_dir, "thread_trials", method.name, f"threads{threads}")
            shutil.rmtree(run_dir, ignore_errors=True)
            run = self._run_method(method, 1, tag, run_dir, threads, trial=True)
            trial = {"threads": threads, "status": run["status"], "process_wall_s": run["process_wall_s"]}
            if run["status"] == "ok":
                trial["train_s_per_step"] = run["train_s_per_step"]
                print(f"{tag}: {run['train_s_per_step']:.3f} s per step", flush=True)
            else:
                trial["error"] = run.get("error")
                print(f"{tag}: failed (see {run_dir}/run.log)", flush=True)
            trials.setdefault(method.name, []).append(trial)
        return trials

    def _trial_scale(self) -> Scale:
        return replace(self.scale, steps=self.trial_steps, test_freq=-1)

    # ---- the toy world's own data -------------------------------------------------------------

    def _npd_config(self, seed: int, scale: Scale | None = None, method: Method | None = None):
        """The NPD config with the benchmark's scale and seed: what SFT copies its settings from
        (``method``: with its teacher)."""
        import verl  # noqa: F401  (loads the verl-npd plugin)
        from hydra import compose, initialize_config_dir

        from verl_npd.toy.resolvers import register
        from verl_npd.trainer.config import store_npd_defaults

        store_npd_defaults()
        register()

        with initialize_config_dir(config_dir=self.recipe.npd_config_dir, version_base=None):
            return compose(
                config_name=self.recipe.npd_config_name,
                overrides=[
                    *run_overrides(scale or self.scale, self.val_files, seed),
                    *(CROSS_TEACHER_OVERRIDES if method is not None and method.cross_teacher else ()),
                ],
            )

    def _prepare_toy(self) -> None:
        from verl_npd.bench import toy_data
        from verl_npd.toy import ensure_toy_world

        print("preparing the toy world, the validation set and the teacher's accuracy on it", flush=True)
        world = ensure_toy_world()
        self.val_files = toy_data.validation_set(world, self.scale.val_size, self.data_dir)
        self.teacher_accuracy = toy_data.model_accuracy(world.teacher_dir, self.val_files)
        print(f"teacher accuracy {self.teacher_accuracy:.3f} on {self.val_files}", flush=True)

    # ---- one method, one seed ----------------------------------------------------------------

    def _run_method(
        self, method: Method, seed: int, desc: str, run_dir: str, threads: int | None, trial: bool = False
    ) -> dict:
        """One run; ``trial``: the thread trial's size and no validation, and the result is its
        training wall-clock per step."""
        os.makedirs(run_dir)
        log_path = os.path.join(run_dir, "run.log")
        result = {"seed": seed, "log": os.path.relpath(log_path, self.out_dir)}
        if method.runner == "sft":
            return {**result, **self._run_sft(method, seed, run_dir, log_path, desc, threads, trial)}
        scale = self._trial_scale() if trial else self.scale
        read = readers.read_npd if method.runner == "npd" else partial(
            readers.read_verl,
            updates_per_step=method.updates_per_step,
            logs_optimizer_steps=method.sizing == "rollout_prompts",
        )
        if method.served_teacher:
            return {**result, **self._run_with_served_teacher(method, seed, run_dir, log_path, desc, threads, trial)}
        command = method_command(
            method,
            self.recipe,
            scale,
            self.val_files,
            seed,
            run_dir,
            threads=threads,
            validate=not trial,
            prompts_per_step=self._npd_config(seed).data.train_batch_size,
        )
        # The progress bar counts logged steps.
        returncode, wall = run_command(command, log_path, scale.steps and scale.steps // method.updates_per_step, desc)
        return {**result, **self._outcome(returncode, wall, log_path, lambda: read(run_dir), trial)}

    @contextlib.contextmanager
    def served_teacher(self, seed: int, run_dir: str, threads: int | None = None) -> Iterator[tuple[str, float]]:
        """The NPD config's teacher behind ``python -m verl_npd.serve`` on a free loopback port, with
        the method's threads, its output in ``run_dir/teacher_server.log``: yields its URL and its
        start-up seconds."""
        teacher_dir = self._npd_config(seed).distillation.teacher_models.teacher_model.model_path
        port = free_port()
        log_path = os.path.join(run_dir, "teacher_server.log")
        with serving(served_teacher_command(teacher_dir, port, threads), port, log_path) as served:
            yield served

    def _run_with_served_teacher(
        self, method: Method, seed: int, run_dir: str, log_path: str, desc: str, threads: int | None, trial: bool
    ) -> dict:
        """Process wall: the served teacher's start-up (a teacher replica's is inside the job's
        process wall), then the job's. Training time leaves both out, as it does all set-up."""
        scale = self._trial_scale() if trial else self.scale
        try:
            with self.served_teacher(seed, run_dir, threads) as (url, start_s):
                print(f"teacher served at {url} (started in {start_s:.0f} s)", flush=True)
                command = method_command(
                    method, self.recipe, scale, self.val_files, seed, run_dir, url, threads, validate=not trial
                )
                returncode, wall = run_command(command, log_path, scale.steps, desc)
        except RuntimeError as e:
            return {"returncode": None, "process_wall_s": 0.0, "status": "failed", "error": str(e)}
        outcome = self._outcome(returncode, start_s + wall, log_path, lambda: readers.read_npd(run_dir), trial)
        return {**outcome, "teacher_server_start_s": start_s}

    def _run_sft(
        self, method: Method, seed: int, run_dir: str, log_path: str, desc: str, threads: int | None, trial: bool
    ) -> dict:
        """Process wall: the teacher's generation (as recorded when it was made), the SFT process and
        the evaluation of its checkpoints. A trial trains on the first batches of the full run's
        responses and evaluates nothing."""
        from verl_npd.bench import toy_data

        config = self._npd_config(seed, method=method)
        n_prompts = config.trainer.total_training_steps * config.data.train_batch_size
        print(f"teacher responses for {n_prompts} training prompts (made once per seed, then cached)", flush=True)
        teacher_dir = config.distillation.teacher_models.teacher_model.model_path
        responses, generation_s = toy_data.teacher_responses(
            teacher_dir, config.data.train_files, n_prompts, seed, self.data_dir
        )
        if trial:
            config = self._npd_config(seed, self._trial_scale(), method)
        command = sft_command(config, responses, run_dir, threads, save=not trial)
        steps = config.trainer.total_training_steps
        returncode, wall = run_command(command, log_path, steps, desc)
        if trial:
            return self._outcome(returncode, wall, log_path, lambda: readers.read_sft(run_dir, 0.0), trial)
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
    def _outcome(returncode: int, wall: float, log_path: str, read, trial: bool = False) -> dict:
        outcome = {"returncode": returncode, "process_wall_s": wall}
        if returncode != 0:
            return {**outcome, "status": "failed", "error": _log_tail(log_path)}
        run = read()
        if trial:
            steps = run.steps or 1
            return {**outcome, "status": "ok", "train_s_per_step": run.train_wall_s / steps}
        if not run.curve:
            return {**outcome, "status": "failed", "error": "the run recorded no validation accuracy"}
        return {**outcome, "status": "ok", **run.as_dict()}

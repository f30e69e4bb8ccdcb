"""What ``main_npd`` shows on the console, and where the rest goes.

A run prints a lot: every Ray worker's warnings, verl's per-step line of 40-odd metrics, Ray's own
start-up and shutdown lines. By default the console gets one progress bar with the figures that
matter, a line per validation and the summary table; everything the process and its Ray workers
print goes to ``run.log`` in the run's output directory (Ray forwards worker output to the driver's
stdout/stderr, whose file descriptors point there while the run lasts). ``npd.verbose=true`` leaves
the stream as it is. A failure's traceback is printed to the console as well as the log.

The bar reads the trainer's progress from the task runner actor (not from files), so the driver
may sit on another node than the trainer.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import IO, Any

from tqdm.auto import tqdm

LOG_NAME = "run.log"


@contextlib.contextmanager
def output_to_log(log_path: str):
    """Point this process's stdout and stderr (file descriptors 1 and 2, which child processes and
    Ray's log forwarding use too) at ``log_path``; yield a stream to the real console."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(saved_out), "w", buffering=1)
    with open(log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield console
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            console.close()


def format_validation(step: int, accuracy: float | None) -> str:
    shown = "n/a" if accuracy is None else f"{100 * accuracy:.1f}%"
    return f"validation at step {step}: accuracy {shown}"


class LiveProgress:
    """A progress bar on ``console`` that follows ``runner.progress()`` until ``stop()``.

    ``runner.progress`` returns the trainer's latest figures: ``step``, ``total``, and when known
    ``accuracy`` with ``validated_step``, ``staleness``, ``kept`` and ``tokens_per_s``.
    """

    def __init__(self, runner, console: IO[str], poll_s: float = 1.0):
        self.runner = runner
        self.console = console
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._bar: tqdm | None = None
        self._validations_shown: set[int] = set()
        self._thread = threading.Thread(target=self._follow, name="npd-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._bar is not None:
            self._bar.close()

    def _follow(self) -> None:
        import ray

        while not self._stop.wait(self.poll_s):
            try:
                progress = ray.get(self.runner.progress.remote(), timeout=30)
            except Exception:  # the runner is busy starting, or gone: the run's own error says why
                continue
            if progress:
                self.show(progress)

    def missed_validations(self, validations: list[dict[str, Any]]) -> list[str]:
        """Lines for the validations no poll saw: the last one can end the run between two polls."""
        return [format_validation(v["step"], v["accuracy"]) for v in validations if v["step"] not in self._validations_shown]

    def show(self, progress: dict[str, Any]) -> None:
        if self._bar is None:
            self._bar = tqdm(
                total=progress["total"],
                initial=progress["step"],
                desc="NPD training",
                unit="step",
                file=self.console,
                dynamic_ncols=True,
            )
        for step, accuracy in progress.get("validations", []):
            if step not in self._validations_shown:
                self._validations_shown.add(step)
                self._bar.write(format_validation(step, accuracy), file=self.console)
        figures = {
            "acc": _pct(progress.get("accuracy")),
            "stale": _num(progress.get("staleness"), "{:.0f}"),
            "kept": _pct(progress.get("kept")),
            "tok/s": _num(progress.get("tokens_per_s"), "{:.0f}"),
        }
        self._bar.set_postfix({k: v for k, v in figures.items() if v is not None}, refresh=False)
        self._bar.update(progress["step"] - self._bar.n)


def _pct(value) -> str | None:
    return None if value is None else f"{100 * value:.1f}%"


def _num(value, fmt: str) -> str | None:
    return None if value is None else fmt.format(value)

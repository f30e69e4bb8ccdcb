"""The end-of-run summary: what a user reads first. The same numbers go to the console (a table),
``summary.json``, ``metrics.jsonl`` (one line per step) and ``accuracy.png``; both the table and
``summary.json`` name the student's Hugging Face directory."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def validation_accuracy(val_metrics: dict[str, float]) -> float | None:
    """verl's core validation number: the mean reward at @1 of the first data source (for the toy
    task, reward 1 is an exactly right answer, so this is accuracy)."""
    keys = sorted(k for k in val_metrics if k.startswith("val-core/") and "/mean@" in k)
    return float(val_metrics[keys[0]]) if keys else None


def training_clock(rows: list[dict[str, Any]], origin_s: float) -> list[float]:
    """The training wall-clock at each step row of ``metrics.jsonl`` (``wall_s`` since the run's
    clock started): from ``origin_s`` (the end of the initial validation) with every validation
    since left out (a validated step's row holds its ``timing/validation``), so that validation, the
    measuring instrument, costs no method training time. The summary's wait share and the
    benchmark's clock are both this."""
    clock, validation_s = [], 0.0
    for row in rows:
        if validation_accuracy(row) is not None:
            if "timing/validation" not in row:
                raise ValueError(f"step {row['step']} was validated but has no timing/validation")
            validation_s += row["timing/validation"]
        clock.append(row["wall_s"] - origin_s - validation_s)
    return clock


@dataclass
class RunSummary:
    """``resume_step``: the checkpoint step this run starts from (0 for a fresh run). Rows of an
    earlier run beyond it describe steps that were rolled back and are trained again, so they are
    removed from ``metrics.jsonl`` and ``positions.jsonl``; rows up to it are kept."""

    output_dir: str
    resume_step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        self.start = time.monotonic()
        self.history: list[dict[str, float]] = []
        self.validations: list[dict[str, float]] = []
        self.initial_accuracy: float | None = None
        self._metrics_file, self._positions_file = (
            _open_history(os.path.join(self.output_dir, name), self.resume_step)
            for name in ("metrics.jsonl", "positions.jsonl")
        )

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def record_validation(self, step: int, val_metrics: dict[str, float], initial: bool = False) -> None:
        accuracy = validation_accuracy(val_metrics)
        if initial:
            self.initial_accuracy = accuracy
        self.validations.append({"step": step, "wall_s": self.elapsed(), "accuracy": accuracy})

    def record_step(self, step: int, metrics: dict[str, float], positions: dict[str, list[int]]) -> None:
        """``positions``: the prompt-stream positions the step trained on, dropped as stale, and
        those the filter dropped since the previous step."""
        row = {"step": step, "wall_s": self.elapsed(), **{k: _plain(v) for k, v in metrics.items()}}
        self.history.append(row)
        for file, line in ((self._metrics_file, row), (self._positions_file, {"step": step, **positions})):
            file.write(json.dumps(line) + "\n")
            file.flush()

    def finish(
        self,
        steps_run: int,
        buffer_counters: dict[str, float],
        interrupted: bool,
        last_checkpoint_step: int,
        student_dir: str,
    ) -> dict[str, Any]:
        self._metrics_file.close()
        self._positions_file.close()
        wall = self.elapsed()
        train_s = sum(r.get("timing/train", 0.0) for r in self.history)
        tokens = sum(r.get("perf/train_tokens", 0.0) for r in self.history)
        wait_s = sum(r.get("timing/wait_gen", 0.0) for r in self.history)
        origin = next((v["wall_s"] for v in self.validations if v["step"] == self.resume_step), 0.0)
        training_s = training_clock(self.history, origin)[-1] if self.history else 0.0
        final = self.validations[-1]["accuracy"] if self.validations else None
        result = {
            "student_accuracy_before": self.initial_accuracy,
            "student_accuracy_after": final,
            **self.extra,
            "steps": steps_run,
            "interrupted": interrupted,
            "last_checkpoint_step": last_checkpoint_step,
            "student_dir": student_dir,
            "wall_time_s": wall,
            "trainer_tokens_per_s": tokens / train_s if train_s else None,
            # Over training time, validations left out, as the benchmark computes it.
            "training_time_s": training_s,
            "trainer_wait_share": wait_s / training_s if training_s > 0 else None,
            "packing_efficiency": _mean_of(self.history, "npd/packing_efficiency"),
            "kept_fraction": _mean_of(self.history, "npd/kept_fraction"),
            "staleness_max": max((r.get("npd/staleness_max", 0.0) for r in self.history), default=None),
            "staleness_mean": _mean_of(self.history, "npd/staleness_mean"),
            "buffer": buffer_counters,
            "validations": self.validations,
        }
        with open(os.path.join(self.output_dir, "summary.json"), "w") as f:
            json.dump(result, f, indent=2)
        self._plot()
        return result

    def _plot(self) -> None:
        points = [v for v in self.validations if v["accuracy"] is not None]
        if len(points) < 2:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([p["wall_s"] for p in points], [p["accuracy"] for p in points], marker="o", label="student")
        if self.extra.get("teacher_accuracy") is not None:
            ax.axhline(self.extra["teacher_accuracy"], linestyle="--", color="gray", label="teacher")
        ax.set_xlabel("wall-clock (s)")
        ax.set_ylabel("validation accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(self.output_dir, "accuracy.png"), dpi=120)
        plt.close(fig)


def _open_history(path: str, last_step: int):
    """``path`` open for appending, with only its rows of ``step <= last_step`` (kept atomically).
    A last line cut short by a kill is dropped: it is a step after the checkpoint (the row of a
    step is written before its checkpoint)."""
    if os.path.exists(path):
        with open(path) as f:
            lines = f.readlines()
        kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= last_step]
        if kept != lines:
            write_text_atomically(path, "".join(kept))
    return open(path, "a")


def write_text_atomically(path: str, text: str) -> None:
    """Write to a temporary file and rename it over ``path``: a kill leaves the old or the new."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def format_summary(result: dict[str, Any], output_dir: str, log_path: str | None = None) -> str:
    rows = [
        ("student accuracy before", _pct(result.get("student_accuracy_before"))),
        ("student accuracy after", _pct(result.get("student_accuracy_after"))),
        ("teacher accuracy", _pct(result.get("teacher_accuracy"))),
        ("steps", str(result["steps"]) + (" (stopped early)" if result.get("interrupted") else "")),
        ("wall time", f"{result['wall_time_s']:.1f} s"),
        ("trainer tokens/s", _num(result.get("trainer_tokens_per_s"), "{:.0f}")),
        ("trainer wait share", _pct(result.get("trainer_wait_share"))),
        ("packing efficiency", _pct(result.get("packing_efficiency"))),
        ("kept fraction", _pct(result.get("kept_fraction"))),
        ("max staleness", _num(result.get("staleness_max"), "{:.0f}")),
    ]
    width = max(len(name) for name, _ in rows)
    lines = ["", "=" * (width + 14), "NPD run summary", "-" * (width + 14)]
    lines += [f"{name:<{width}}  {value:>10}" for name, value in rows]
    lines += ["-" * (width + 14), f"student model (Hugging Face): {result['student_dir']}"]
    for lost in result.get("servers_lost") or ():
        lines.append(f"{lost['servers']} servers lost: {', '.join(lost['dead'])}; their {lost['moved']} requests in flight went to the others")
    if result.get("stopped_during_sync") is not None:
        lines.append(f"the stop came during the weight sync to version {result['stopped_during_sync']}, which finished first")
    for skipped in result.get("unusable_checkpoints") or ():
        lines.append(f"the checkpoint of step {skipped['step']} was unusable ({skipped['problem']}): resumed from an earlier one")
    lines.append(f"written to {output_dir}/summary.json (metrics.jsonl, accuracy.png)")
    if log_path is not None:
        lines.append(f"full log (Ray, verl, every metric) in {log_path}")
    lines.append("")
    return "\n".join(lines)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def _mean_of(history: list[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in history if key in r and r[key] == r[key]]
    return float(np.mean(values)) if values else None


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    return value

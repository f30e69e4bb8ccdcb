"""Each method's own outputs, read into one shape (``MethodRun``).

Wall-clock is *training* time: seconds of training since the training loop started, after the workers
are up and the untrained student has been validated, with every validation pause left out
(validation is the measuring instrument, and its cost differs between entry points). Start-up and
validation are in the process wall time, which the runner measures. Per method:

- NPD: ``metrics.jsonl`` and ``summary.json`` of ``verl_npd/trainer/summary.py``: the ``wall_s`` of
  each step, minus that of the initial validation and minus the ``timing/validation`` of every
  validation so far (NPD validates after the step, before the row is written);
- verl (``main_ppo``): its tracking's file backend, one line per step; wall-clock is the running sum
  of ``timing_s/step`` (verl times validation, ``timing_s/testing``, outside the step);
- SFT: ``timeline.jsonl`` of ``verl_npd.bench.sft_trainer`` and ``evaluations.json``; its wall-clock
  starts with the teacher's generation of the SFT data, then runs over the updates (checkpoint saves
  and evaluations are left out).

Time breakdown: generation wait (the trainer waiting for samples: NPD ``timing/wait_gen``, verl
``timing_s/gen``, SFT the teacher's generation), train (the optimizer update: ``timing/train``,
``timing_s/update_actor``, SFT's ``train_batch``), sync (weights to the rollout: ``timing/sync``,
``timing_s/update_weights``) and other (the rest of the training wall-clock: verl's old-log-prob
pass, bookkeeping). ``validation_s`` is the time the validations took, outside the training time.

Scoring per wave (NPD only): the mean of ``timing/teacher``, a wave's teacher scoring from first
request to last answer, over the steps that record it (each step's value is the mean of the waves
that finished since the step before): what a teacher replica and a served teacher cost per wave.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from verl_npd.trainer.summary import training_clock, validation_accuracy


@dataclass
class MethodRun:
    # Validation points: {"step", "wall_s", "tokens", "accuracy"}; step 0 is the untrained student.
    curve: list[dict] = field(default_factory=list)
    train_wall_s: float = 0.0
    # Optimizer steps trained.
    steps: int = 0
    # Seconds the validations during training took (left out of train_wall_s and of the curve).
    validation_s: float = 0.0
    train_tokens: float = 0.0
    # generation_wait / train / sync / other, in seconds; they add up to train_wall_s.
    breakdown_s: dict[str, float] = field(default_factory=dict)
    # Tokens (prompt + response) per second of optimizer update.
    trainer_tokens_per_s: float | None = None
    # NPD only: real tokens / (micro-batches x token budget), and the share of samples Δ-IFD kept.
    packing_efficiency: float | None = None
    kept_fraction: float | None = None
    # NPD only: seconds of teacher scoring per wave (module docstring).
    teacher_s_per_wave: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def steps_done(path: str) -> int:
    """Trained steps recorded so far in a per-step JSON-lines file (step 0 is the initial validation)."""
    return len({row["step"] for row in read_jsonl(path) if row.get("step", 0) > 0})


def _breakdown(wall_s: float, generation_wait: float, train: float, sync: float) -> dict[str, float]:
    return {
        "generation_wait": generation_wait,
        "train": train,
        "sync": sync,
        "other": max(0.0, wall_s - generation_wait - train - sync),
    }


def read_npd(run_dir: str) -> MethodRun:
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    history = sorted(read_jsonl(os.path.join(run_dir, "metrics.jsonl")), key=lambda r: r["step"])
    initial = [v for v in summary["validations"] if v["step"] == 0]
    # The clock of summary.py starts before the initial validation; training starts after it.
    origin = initial[0]["wall_s"] if initial else 0.0
    curve = [{"step": 0, "wall_s": 0.0, "tokens": 0.0, "accuracy": initial[0]["accuracy"]}] if initial else []
    try:
        clock = training_clock(history, origin)
    except ValueError as e:
        raise ValueError(f"{run_dir}/metrics.jsonl: {e}") from None
    tokens = 0.0
    for row, wall in zip(history, clock):
        tokens += row.get("perf/train_tokens", 0.0)
        accuracy = validation_accuracy(row)
        if accuracy is not None:
            curve.append({"step": row["step"], "wall_s": wall, "tokens": tokens, "accuracy": accuracy})
    wall = clock[-1] if clock else 0.0
    train_s = sum(r.get("timing/train", 0.0) for r in history)
    scoring = [r["timing/teacher"] for r in history if "timing/teacher" in r]
    return MethodRun(
        curve=curve,
        train_wall_s=wall,
        validation_s=sum(r.get("timing/validation", 0.0) for r in history),
        train_tokens=tokens,
        breakdown_s=_breakdown(
            wall,
            generation_wait=sum(r.get("timing/wait_gen", 0.0) for r in history),
            train=train_s,
            sync=sum(r.get("timing/sync", 0.0) for r in history),
        ),
        trainer_tokens_per_s=tokens / train_s if train_s else None,
        steps=len(history),
        packing_efficiency=summary.get("packing_efficiency"),
        kept_fraction=summary.get("kept_fraction"),
        teacher_s_per_wave=sum(scoring) / len(scoring) if scoring else None,
    )


# verl's fully_async trainer logs its validation time and weight sync under names of its own.
VALIDATION_TIME_KEYS = ("timing_s/testing", "rollouter/validate_time")
SYNC_TIME_KEYS = ("timing_s/update_weights", "timing_s/timing_s/param_sync")


def read_verl(run_dir: str, updates_per_step: int = 1, logs_optimizer_steps: bool = False) -> MethodRun:
    """verl's file-logger rows. A step's rows are read together (fully_async writes its validation
    row before the step's training row), so a validation's wall-clock includes its step; curve steps
    are optimizer steps (``updates_per_step`` per logged step in the asynchronous modes).
    ``logs_optimizer_steps``: the trainer counts the optimizer steps it logged in
    ``training/global_step`` (fully_async, whose last one is never logged)."""
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    by_step: dict[int, list[dict]] = {}
    for row in rows:
        by_step.setdefault(row["step"], []).append(row["data"])
    curve, wall, tokens, validation_s, steps = [], 0.0, 0.0, 0.0, 0
    generation_wait = train_s = sync = 0.0
    global_step = 0
    for step in sorted(by_step):
        accuracy = None
        for data in by_step[step]:
            if step > 0 and "timing_s/step" in data:
                steps += updates_per_step
                wall += data["timing_s/step"]
                tokens += data.get("perf/total_num_tokens", 0.0)
                generation_wait += data.get("timing_s/gen", 0.0)
                train_s += data.get("timing_s/update_actor", 0.0)
                sync += sum(data.get(key, 0.0) for key in SYNC_TIME_KEYS)
                global_step = int(data.get("training/global_step", global_step))
            if step > 0:
                validation_s += sum(data.get(key, 0.0) for key in VALIDATION_TIME_KEYS)
            accuracy = validation_accuracy(data) if accuracy is None else accuracy
        if accuracy is not None:
            curve.append({"step": step * updates_per_step, "wall_s": wall, "tokens": tokens, "accuracy": accuracy})
    return MethodRun(
        curve=curve,
        train_wall_s=wall,
        validation_s=validation_s,
        train_tokens=tokens,
        breakdown_s=_breakdown(wall, generation_wait, train_s, sync),
        trainer_tokens_per_s=tokens / train_s if train_s else None,
        steps=global_step if logs_optimizer_steps else steps,
    )


def read_sft(run_dir: str, teacher_generation_s: float) -> MethodRun:
    timeline = {row["step"]: row for row in read_jsonl(os.path.join(run_dir, "timeline.jsonl"))}
    evaluations = []
    # Absent in a thread trial, which saves no checkpoints to evaluate.
    if os.path.exists(os.path.join(run_dir, "evaluations.json")):
        with open(os.path.join(run_dir, "evaluations.json")) as f:
            evaluations = json.load(f)
    curve = []
    for evaluation in evaluations:
        step = evaluation["step"]
        # The untrained student is evaluated before the clock starts, as for the other methods.
        wall = teacher_generation_s + timeline[step]["wall_s"] if step > 0 else 0.0
        tokens = sum(r["tokens"] for s, r in timeline.items() if s <= step)
        curve.append({"step": step, "wall_s": wall, "tokens": tokens, "accuracy": evaluation["accuracy"]})
    last = timeline[max(timeline)] if timeline else {"wall_s": 0.0}
    wall = teacher_generation_s + last["wall_s"]
    tokens = sum(r["tokens"] for r in timeline.values())
    train_s = sum(r["train_s"] for r in timeline.values())
    return MethodRun(
        curve=curve,
        train_wall_s=wall,
        validation_s=sum(e["eval_s"] for e in evaluations if e["step"] > 0),
        train_tokens=tokens,
        breakdown_s=_breakdown(wall, teacher_generation_s, train_s, 0.0),
        trainer_tokens_per_s=tokens / train_s if train_s else None,
        steps=len(timeline),
    )

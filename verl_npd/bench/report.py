"""From the methods' runs (several seeds each) to the verdict: the target accuracy, time to it, mean and
spread over seeds, the issue's goals (met or missed, by how much), ``results.json``, ``results.md`` and
the plots."""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

# The target: this share of the teacher's validation accuracy, for every method alike. It is never
# lowered: a method that does not reach it in the horizon is reported as not reaching it.
TARGET_SHARE = 0.9
TARGET_RULE = (
    f"{TARGET_SHARE:.0%} of the teacher's validation accuracy, for every method; a method reaches it at "
    "the first validation at or above it that the next validation confirms (also at or above it)."
)
# The final accuracy of a run: the mean of its last validations (one validation of a few hundred
# prompts swings by a few points), reported beside the best.
FINAL_VALIDATIONS = 3
# The goals for NPD (benchmarks, not tests).
MIN_SPEEDUP_OVER_OPD = 3.0
MAX_ACCURACY_LOSS_TO_OPD = 0.01
MIN_ACCURACY_GAIN_OVER_SFT = 0.05
MAX_WAIT_SHARE = 0.10
# Scalar per-seed numbers that are averaged over seeds (None where a method does not report one).
PER_SEED_STATS = (
    "initial_accuracy", "final_accuracy", "last_accuracy", "best_accuracy", "train_wall_s", "validation_s",
    "process_wall_s", "train_tokens", "trainer_tokens_per_s", "tokens_per_wall_s", "wait_share",
    "packing_efficiency", "kept_fraction", "teacher_s_per_wave",
)  # fmt: skip
BREAKDOWN_PARTS = ("generation_wait", "train", "sync", "other")


def time_to(curve: list[dict], accuracy: float | None) -> float | None:
    """Training wall-clock of the first validation at or above ``accuracy`` whose next validation is at
    or above it too (None: never reached so; a crossing at the last validation is unconfirmed)."""
    if accuracy is None:
        return None
    for point, following in zip(curve, curve[1:]):
        if min(point["accuracy"], following["accuracy"]) >= accuracy - 1e-9:
            return point["wall_s"]
    return None


def final_accuracy(curve: list[dict]) -> float:
    """The mean of the last ``FINAL_VALIDATIONS`` validations after the initial one (fewer when the run
    has fewer)."""
    trained = curve[1:] or curve
    return statistics.fmean(p["accuracy"] for p in trained[-FINAL_VALIDATIONS:])


def spread(values: list[float | None]) -> dict | None:
    """Mean, sample standard deviation (None for one value), min and max of the values that exist."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {
        "mean": statistics.fmean(present),
        "std": statistics.stdev(present) if len(present) > 1 else None,
        "min": min(present),
        "max": max(present),
        "n": len(present),
    }


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """Per validation step that every curve has: the mean wall-clock and tokens, and the mean, min and
    max accuracy over the curves (the seeds of one method validate at the same steps)."""
    if not curves:
        return []
    by_step = [{p["step"]: p for p in curve} for curve in curves]
    common = sorted(set.intersection(*(set(points) for points in by_step)))
    return [
        {
            "step": step,
            "wall_s": statistics.fmean(points[step]["wall_s"] for points in by_step),
            "tokens": statistics.fmean(points[step]["tokens"] for points in by_step),
            "accuracy": statistics.fmean(points[step]["accuracy"] for points in by_step),
            "accuracy_min": min(points[step]["accuracy"] for points in by_step),
            "accuracy_max": max(points[step]["accuracy"] for points in by_step),
        }
        for step in common
    ]


def choose_target(teacher_accuracy: float | None) -> dict:
    """``TARGET_RULE``'s accuracy; none when the teacher's accuracy is unknown (a GPU recipe run
    without ``--teacher-accuracy``), and then nothing is timed."""
    if teacher_accuracy is None:
        return {"accuracy": None, "reason": "the teacher's accuracy is unknown (give --teacher-accuracy): nothing is timed"}
    return {"accuracy": TARGET_SHARE * teacher_accuracy, "reason": f"{TARGET_SHARE:.0%} of the teacher's {_pct(teacher_accuracy)}"}


def _seed_numbers(run: dict, target: float | None) -> dict:
    """The per-seed numbers of one successful run (``MethodRun.as_dict()`` plus the runner's fields)."""
    accuracies = [p["accuracy"] for p in run["curve"]]
    wall = run["train_wall_s"]
    return {
        "initial_accuracy": accuracies[0],
        "final_accuracy": final_accuracy(run["curve"]),
        "last_accuracy": accuracies[-1],
        "best_accuracy": max(accuracies),
        "time_to_target_s": time_to(run["curve"], target),
        "wait_share": run["breakdown_s"]["generation_wait"] / wall if wall else None,
        "tokens_per_wall_s": run["train_tokens"] / wall if wall else None,
    }


def summarize_method(method: dict, target: float | None) -> None:
    """Adds each successful seed's numbers to its run, and the method's mean and spread over them."""
    ok = [run for run in method["runs"] if run["status"] == "ok"]
    for run in ok:
        run.update(_seed_numbers(run, target))
    reached = [run["time_to_target_s"] for run in ok if run["time_to_target_s"] is not None]
    breakdown = {part: statistics.fmean(run["breakdown_s"][part] for run in ok) for part in BREAKDOWN_PARTS} if ok else None
    method.update(
        seeds_ok=len(ok),
        status="failed" if not ok else ("ok" if len(ok) == len(method["runs"]) else "partial"),
        target_reached=len(reached),
        time_to_target_s=spread(reached),
        # Seeds that never reach the target count with their whole training time: a lower bound.
        time_to_target_bound_s=spread(
            [run["time_to_target_s"] if run["time_to_target_s"] is not None else run["train_wall_s"] for run in ok]
        ),
        breakdown_s=breakdown,
        mean_curve=mean_curve([run["curve"] for run in ok]),
        **{key: spread([run.get(key) for run in ok]) for key in PER_SEED_STATS},
    )


def build_results(settings: dict, teacher_accuracy: float | None, methods: dict[str, dict]) -> dict:
    """``methods``: name -> {label, opd_mode (one of verl's OPD modes, NPD's baselines), status
    ("skipped" with an error, or anything else), runs: one per seed, each {seed, status,
    returncode, process_wall_s, log, [MethodRun fields]}}."""
    target = choose_target(teacher_accuracy)
    for method in methods.values():
        if method.get("status") != "skipped":
            summarize_method(method, target["accuracy"])
    results = {
        "settings": settings,
        "teacher_accuracy": teacher_accuracy,
        "target": {**target, "rule": TARGET_RULE},
        "methods": methods,
    }
    results["goals"] = check_goals(results)
    return results


# ---- goals -----------------------------------------------------------------------------------------


def _goal(goal: str, met: bool | None, detail: str) -> dict:
    verdict = "n/a" if met is None else ("met" if met else "missed")
    return {"goal": goal, "met": met, "detail": f"{verdict}: {detail}"}


def _mean(method: dict | None, key: str) -> float | None:
    stats = None if method is None else method.get(key)
    return None if stats is None else stats["mean"]


def check_goals(results: dict) -> list[dict]:
    methods = {n: m for n, m in results["methods"].items() if m["status"] in ("ok", "partial")}
    npd, sft = methods.get("npd"), methods.get("sft")
    opd_modes = {n: m for n, m in methods.items() if m.get("opd_mode")}
    npd_final, sft_final = _mean(npd, "final_accuracy"), _mean(sft, "final_accuracy")
    best_opd = max(opd_modes, key=lambda n: _mean(opd_modes[n], "final_accuracy"), default=None)
    return [
        _speedup_goal(npd, opd_modes, results["target"]["accuracy"]),
        _margin_goal(
            f"NPD final accuracy (mean over seeds) >= the best verl OPD mode's - {100 * MAX_ACCURACY_LOSS_TO_OPD:.0f} pt",
            npd_final, _mean(opd_modes.get(best_opd), "final_accuracy"), -MAX_ACCURACY_LOSS_TO_OPD, best_opd or "OPD",
        ),
        _margin_goal(
            f"NPD final accuracy (mean over seeds) >= SFT's + {100 * MIN_ACCURACY_GAIN_OVER_SFT:.0f} pt",
            npd_final, sft_final, MIN_ACCURACY_GAIN_OVER_SFT, "SFT",
        ),
        _wait_share_goal(_mean(npd, "wait_share")),
    ]  # fmt: skip


def _speedup_goal(npd: dict | None, opd_modes: dict[str, dict], target: float | None) -> dict:
    """NPD's mean time to the target against the fastest verl OPD mode's. A mode with seeds that never
    reach the target counts them at their whole training time, so its mean is a lower bound, and so
    is the speedup over it: the goal is then met only when that bound meets it."""
    goal = f"NPD reaches the target >= {MIN_SPEEDUP_OVER_OPD:.0f}x faster than the fastest verl OPD mode"
    if npd is None or not opd_modes:
        return _goal(goal, None, "needs successful npd and verl OPD runs")
    if target is None:
        return _goal(goal, None, "no target accuracy (see the target's reason)")
    if npd["target_reached"] < npd["seeds_ok"]:
        return _goal(goal, False, f"NPD reached the target in {npd['target_reached']} of {npd['seeds_ok']} seeds")
    t_npd = npd["time_to_target_s"]["mean"]
    ratios = {}
    for name, mode in opd_modes.items():
        bound = mode["time_to_target_bound_s"]["mean"] / max(t_npd, 1e-9)
        ratios[name] = (bound, mode["target_reached"] < mode["seeds_ok"])
    fastest = min(ratios, key=lambda name: ratios[name][0])
    speedup, censored = ratios[fastest]
    each = "; ".join(
        f"{name} {'>= ' if cut else ''}{ratio:.2f}x ({opd_modes[name]['target_reached']}/{opd_modes[name]['seeds_ok']} "
        "seeds reached)"
        for name, (ratio, cut) in ratios.items()
    )
    detail = f"fastest {fastest}: {'>= ' if censored else ''}{speedup:.2f}x (NPD {_stat_s(npd['time_to_target_s'])}); {each}"
    if censored and speedup < MIN_SPEEDUP_OVER_OPD:
        return _goal(goal, None, f"undetermined, only a lower bound is known: {detail}")
    return _goal(goal, speedup >= MIN_SPEEDUP_OVER_OPD, detail)


def _margin_goal(goal: str, npd: float | None, other: float | None, min_lead: float, name: str) -> dict:
    """NPD's mean final accuracy at least ``other + min_lead``."""
    if npd is None or other is None:
        return _goal(goal, None, f"needs successful npd and {name} runs")
    margin = npd - (other + min_lead)
    return _goal(goal, margin >= -1e-12, f"NPD {_pct(npd)}, {name} {_pct(other)}: margin {_pts(margin)}")


def _wait_share_goal(share: float | None) -> dict:
    goal = f"NPD trainer wait share (mean over seeds) < {MAX_WAIT_SHARE:.0%}"
    if share is None:
        return _goal(goal, None, "needs a successful npd run")
    return _goal(goal, share < MAX_WAIT_SHARE, f"{_pct(share)}: margin {_pts(MAX_WAIT_SHARE - share)}")


# ---- writing ---------------------------------------------------------------------------------------


def write_results(results: dict, out_dir: str) -> str:
    """results.json, results.md and the PNGs in ``out_dir``; returns the markdown."""
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    markdown = format_markdown(results)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown)
    plot_accuracy(results, out_dir)
    plot_time_breakdown(results, out_dir)
    return markdown


def format_markdown(results: dict) -> str:
    settings, target = results["settings"], results["target"]
    lines = ["# NPD vs verl's on-policy distillation vs SFT", ""]
    lines += [f"- {k}: {v}" for k, v in settings.items()]
    lines += [
        f"- teacher accuracy: {_pct(results['teacher_accuracy'])}",
        f"- target: {_pct(target['accuracy'])} ({target['reason']})",
        f"- target rule: {target['rule']}",
        "",
        "Training wall-clock (time to target, train wall, the plots) runs from the end of the initial "
        "validation and leaves out every validation pause; process wall is the whole run, start-up and "
        "validations included. Numbers are means over the seeds that ran, some with [min, max] and the "
        f"sample standard deviation (sd). Final accuracy is the mean of a run's last {FINAL_VALIDATIONS} "
        "validations; time to target is over the seeds that reach it, and with \"bound\" over every seed, "
        "a seed that never reaches it counted at its whole training time (a lower bound). Tokens are "
        "prompt + response tokens trained on. Threads: torch threads per process, the better of the "
        "thread trials below. Scoring per wave (NPD methods): the mean time of a wave's teacher scoring, "
        "first request to last answer (timing/teacher).",
        "",
    ]
    header = ["method", "seeds ok", "threads", "acc before", "acc final", "acc last", "acc best"]
    header += ["time to target (s)", "train wall (s)", "validation (s)", "process wall (s)", "tokens"]
    header += ["trainer tok/s", "tok/s (wall)", "gen wait share", "packing eff.", "kept", "scoring per wave (s)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in results["methods"].items():
        label = f"{name} ({m['label']})"
        if m["status"] == "skipped":
            row = [label, f"skipped ({m['error']})"] + ["n/a"] * (len(header) - 2)
        elif m["status"] == "failed":
            logs = ", ".join(run["log"] for run in m["runs"])
            row = [label, f"0/{len(m['runs'])} (see {logs})"] + ["n/a"] * (len(header) - 2)
        else:
            row = [label, f"{m['seeds_ok']}/{len(m['runs'])}", str(m.get("threads") or "default")]
            row += [_stat(m["initial_accuracy"], "pct"), _stat(m["final_accuracy"], "pct", "full")]
            row += [_stat(m[key], "pct") for key in ("last_accuracy", "best_accuracy")]
            row += [_time_to_target(m)]
            row += [_stat(m["train_wall_s"], "{:.0f}", "range")]
            row += [_stat(m[key], "{:.0f}") for key in ("validation_s", "process_wall_s", "train_tokens")]
            row += [_stat(m[key], "{:.0f}") for key in ("trainer_tokens_per_s", "tokens_per_wall_s")]
            row += [_stat(m["wait_share"], "pct", "range")]
            row += [_stat(m[key], "pct") for key in ("packing_efficiency", "kept_fraction")]
            row += [_stat(m["teacher_s_per_wave"], "{:.3f}")]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Goals (benchmarks, not tests)", "", "| goal | met | detail |", "|---|---|---|"]
    for g in results["goals"]:
        met = "n/a" if g["met"] is None else ("yes" if g["met"] else "no")
        lines.append(f"| {g['goal']} | {met} | {g['detail']} |")
    lines += ["", "## Per seed", ""]
    header = ["method", "seed", "status", "acc final", "acc last", "acc best", "time to target (s)"]
    header += ["train wall (s)", "validation (s)", "process wall (s)", "gen wait share", "scoring per wave (s)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in results["methods"].items():
        for run in m.get("runs", []):
            row = [name, str(run["seed"]), run["status"] if run["status"] == "ok" else f"{run['status']} ({run['log']})"]
            if run["status"] == "ok":
                row += [_pct(run[key]) for key in ("final_accuracy", "last_accuracy", "best_accuracy")]
                row += [_num(run["time_to_target_s"], "{:.0f}", "not reached")]
                row += [f"{run[key]:.0f}" for key in ("train_wall_s", "validation_s", "process_wall_s")]
                row.append(_pct(run["wait_share"]))
                row.append(_num(run.get("teacher_s_per_wave"), "{:.3f}"))
            else:
                row += ["n/a"] * (len(header) - 3)
            lines.append("| " + " | ".join(row) + " |")
    trials = results.get("thread_trials")
    if trials:
        lines += ["", "## Thread trials", "", THREAD_TRIALS_TEXT, ""]
        lines += ["| method | threads per process | status | train wall per step (s) | kept |", "|---|---|---|---|---|"]
        for name, tried in trials.items():
            for trial in tried:
                per_step = _num(trial.get("train_s_per_step"), "{:.3f}")
                kept = "yes" if trial["threads"] == results["methods"].get(name, {}).get("threads") else ""
                lines.append(f"| {name} | {trial['threads']} | {trial['status']} | {per_step} | {kept} |")
    lines += ["", "Plots: accuracy_vs_wallclock.png, accuracy_vs_tokens.png, time_breakdown.png", ""]
    return "\n".join(lines)


THREAD_TRIALS_TEXT = (
    "Before the seeds run, each method runs a short trial (seed 1, no validation during training) with each "
    "thread split, and keeps the one with the least training wall-clock per step."
)


def _time_to_target(m: dict) -> str:
    text = f"{_stat(m['time_to_target_s'], '{:.0f}', 'full')} ({m['target_reached']}/{m['seeds_ok']} reached)"
    if m["target_reached"] < m["seeds_ok"]:
        text += f", bound {_stat(m['time_to_target_bound_s'], '{:.0f}')}"
    return text


def _summarized(results: dict) -> dict[str, dict]:
    return {n: m for n, m in results["methods"].items() if m["status"] in ("ok", "partial")}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(results: dict, out_dir: str) -> None:
    """Accuracy against training wall-clock and against training tokens: every seed a thin line, the
    mean over seeds a thick one, a colour per method."""
    plt = _pyplot()
    for x_key, x_label, file_name in (
        ("wall_s", "training wall-clock, validation pauses excluded (s)", "accuracy_vs_wallclock.png"),
        ("tokens", "training tokens (prompt + response)", "accuracy_vs_tokens.png"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for index, m in enumerate(_summarized(results).values()):
            color = f"C{index}"
            for run in m["runs"]:
                if run["status"] == "ok":
                    curve = run["curve"]
                    ax.plot([p[x_key] for p in curve], [p["accuracy"] for p in curve], color=color, alpha=0.3, lw=0.8)
            curve = m["mean_curve"]
            label = f"{m['label']} (mean of {m['seeds_ok']})"
            ax.plot(
                [p[x_key] for p in curve], [p["accuracy"] for p in curve], color=color, marker="o", ms=3, label=label
            )
        if results["teacher_accuracy"] is not None:
            ax.axhline(results["teacher_accuracy"], linestyle="--", color="gray", label="teacher")
        if results["target"]["accuracy"] is not None:
            ax.axhline(results["target"]["accuracy"], linestyle=":", color="black", linewidth=0.8, label="target")
        ax.set_xlabel(x_label)
        ax.set_ylabel("validation accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, file_name), dpi=120)
        plt.close(fig)


def plot_time_breakdown(results: dict, out_dir: str) -> None:
    """Stacked bars per method, mean over seeds: generation wait / train / sync / other seconds."""
    plt = _pyplot()
    methods = _summarized(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(methods)), 4.5))
    bottoms = [0.0] * len(methods)
    for part in BREAKDOWN_PARTS:
        values = [m["breakdown_s"][part] for m in methods.values()]
        ax.bar(list(methods), values, bottom=bottoms, label=part.replace("_", " "))
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.set_ylabel("training wall-clock, mean over seeds (s)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "time_breakdown.png"), dpi=120)
    plt.close(fig)


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _pts(value: float) -> str:
    return f"{100 * value:+.1f} pt"


def _num(value: Any, fmt: str, missing: str = "n/a") -> str:
    return missing if value is None else fmt.format(value)


def _stat(stats: dict | None, fmt: str, detail: str = "mean") -> str:
    """The mean over seeds; with ``detail`` "range" also ``[min, max]``, with "full" also the sample
    standard deviation (sd). ``fmt`` "pct" for percentages."""
    if stats is None:
        return "n/a"
    show = _pct if fmt == "pct" else fmt.format
    text = show(stats["mean"])
    if stats["n"] == 1 or detail == "mean":
        return text
    text += f" [{show(stats['min'])}, {show(stats['max'])}]"
    if detail == "full":
        text += f" sd {100 * stats['std']:.1f} pt" if fmt == "pct" else f" sd {show(stats['std'])}"
    return text


def _stat_s(stats: dict) -> str:
    return _stat(stats, "{:.0f}", "full") + " s"

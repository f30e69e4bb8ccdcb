"""From the methods' runs (several seeds each) to the verdict: the target accuracy, time to it, mean and
spread over seeds, the issue's goals (met or missed, by how much), ``results.json``, ``results.md`` and
the plots."""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

# The target accuracy, as a share of a reference accuracy: the teacher's, or sync OPD's when sync OPD
# does not reach that share of the teacher's.
TARGET_SHARE = 0.9
TARGET_RULE = (
    f"{TARGET_SHARE:.0%} of the teacher's validation accuracy when every seed of verl's sync OPD reaches "
    f"it; otherwise lowered to {TARGET_SHARE:.0%} of the accuracy sync OPD reaches (the lowest final "
    "accuracy of its seeds, so that every seed reaches the target). One target for every method."
)
# The goals for NPD (benchmarks, not tests).
MIN_SPEEDUP_OVER_OPD = 2.5
SPEEDUP_ASPIRATION = 3.0
MAX_ACCURACY_LOSS_TO_OPD = 0.01
MIN_ACCURACY_GAIN_OVER_SFT = 0.05
MAX_WAIT_SHARE = 0.15
# Scalar per-seed numbers that are averaged over seeds (None where a method does not report one).
PER_SEED_STATS = (
    "initial_accuracy", "final_accuracy", "best_accuracy", "train_wall_s", "validation_s", "process_wall_s",
    "train_tokens", "trainer_tokens_per_s", "tokens_per_wall_s", "wait_share", "packing_efficiency",
    "kept_fraction",
)  # fmt: skip
BREAKDOWN_PARTS = ("generation_wait", "train", "sync", "other")


def time_to(curve: list[dict], accuracy: float | None) -> float | None:
    """Training wall-clock of the first validation at or above ``accuracy`` (None: never reached)."""
    if accuracy is None:
        return None
    return next((p["wall_s"] for p in curve if p["accuracy"] >= accuracy - 1e-9), None)


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


def choose_target(teacher_accuracy: float | None, opd_curves: list[list[dict]]) -> dict:
    """The target of ``TARGET_RULE`` from the teacher's accuracy and the curves of sync OPD's seeds.

    Why a share of OPD's final accuracy, not its best: a curve that levels off ends in validations
    that differ by noise alone, and a target at their top would time luck, not learning speed."""
    nominal = None if teacher_accuracy is None else TARGET_SHARE * teacher_accuracy
    if not opd_curves:
        return {"accuracy": nominal, "lowered": False, "reason": "no successful sync OPD run to check it against"}
    bests = ", ".join(_pct(max(p["accuracy"] for p in curve)) for curve in opd_curves)
    if nominal is not None and all(time_to(curve, nominal) is not None for curve in opd_curves):
        return {
            "accuracy": nominal,
            "lowered": False,
            "reason": f"every sync OPD seed reaches it (their best: {bests})",
        }
    lowered = TARGET_SHARE * min(curve[-1]["accuracy"] for curve in opd_curves)
    if lowered <= max(curve[0]["accuracy"] for curve in opd_curves) + 1e-9:
        reason = f"sync OPD did not improve on the untrained student by enough to time a target (its best: {bests})"
        return {"accuracy": None, "lowered": True, "reason": reason}
    missed = (
        "the teacher's accuracy is unknown" if nominal is None else f"not every sync OPD seed reaches {_pct(nominal)}"
    )
    reason = (
        f"{missed} (their best: {bests}); lowered to {TARGET_SHARE:.0%} of {_pct(lowered / TARGET_SHARE)}, "
        "the lowest final accuracy of the sync OPD seeds"
    )
    return {"accuracy": lowered, "lowered": True, "reason": reason}


def _seed_numbers(run: dict, target: float | None) -> dict:
    """The per-seed numbers of one successful run (``MethodRun.as_dict()`` plus the runner's fields)."""
    accuracies = [p["accuracy"] for p in run["curve"]]
    wall = run["train_wall_s"]
    return {
        "initial_accuracy": accuracies[0],
        "final_accuracy": accuracies[-1],
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
    breakdown = {part: statistics.fmean(run["breakdown_s"][part] for run in ok) for part in BREAKDOWN_PARTS}
    method.update(
        seeds_ok=len(ok),
        status="failed" if not ok else ("ok" if len(ok) == len(method["runs"]) else "partial"),
        target_reached=len(reached),
        time_to_target_s=spread(reached),
        breakdown_s=breakdown if ok else None,
        mean_curve=mean_curve([run["curve"] for run in ok]),
        **{key: spread([run.get(key) for run in ok]) for key in PER_SEED_STATS},
    )


def build_results(settings: dict, teacher_accuracy: float | None, methods: dict[str, dict]) -> dict:
    """``methods``: name -> {label, status ("skipped" with an error, or anything else), runs: one per
    seed, each {seed, status, returncode, process_wall_s, log, [MethodRun fields]}}."""
    opd = methods.get("opd")
    opd_curves = [run["curve"] for run in opd["runs"] if run["status"] == "ok"] if opd else []
    target = choose_target(teacher_accuracy, opd_curves)
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
    npd, opd, sft = methods.get("npd"), methods.get("opd"), methods.get("sft")
    npd_final, opd_final, sft_final = (_mean(m, "final_accuracy") for m in (npd, opd, sft))
    return [
        _speedup_goal(npd, opd, results["target"]["accuracy"]),
        _margin_goal(
            f"NPD final accuracy (mean over seeds) >= sync OPD's - {100 * MAX_ACCURACY_LOSS_TO_OPD:.0f} pt",
            npd_final, opd_final, -MAX_ACCURACY_LOSS_TO_OPD, "OPD",
        ),
        _margin_goal(
            f"NPD final accuracy (mean over seeds) >= SFT's + {100 * MIN_ACCURACY_GAIN_OVER_SFT:.0f} pt",
            npd_final, sft_final, MIN_ACCURACY_GAIN_OVER_SFT, "SFT",
        ),
        _wait_share_goal(_mean(npd, "wait_share")),
    ]  # fmt: skip


def _speedup_goal(npd: dict | None, opd: dict | None, target: float | None) -> dict:
    """Mean time to the target of sync OPD over NPD's, when every seed of both reached it."""
    goal = (
        f"NPD reaches the target >= {MIN_SPEEDUP_OVER_OPD}x faster than sync OPD (aspiration {SPEEDUP_ASPIRATION:.0f}x)"
    )
    if npd is None or opd is None:
        return _goal(goal, None, "needs successful npd and opd runs")
    if target is None:
        return _goal(goal, None, "no target accuracy (see the target's reason)")
    if npd["target_reached"] < npd["seeds_ok"]:
        return _goal(goal, False, f"NPD reached the target in {npd['target_reached']} of {npd['seeds_ok']} seeds")
    if opd["target_reached"] < opd["seeds_ok"]:
        return _goal(goal, None, f"sync OPD reached the target in {opd['target_reached']} of {opd['seeds_ok']} seeds")
    t_npd, t_opd = npd["time_to_target_s"]["mean"], opd["time_to_target_s"]["mean"]
    speedup = t_opd / max(t_npd, 1e-9)
    aspiration = "reaches" if speedup >= SPEEDUP_ASPIRATION else "short of"
    detail = (
        f"{speedup:.2f}x (NPD {_stat_s(npd['time_to_target_s'])}, OPD {_stat_s(opd['time_to_target_s'])}); "
        f"margin {speedup - MIN_SPEEDUP_OVER_OPD:+.2f}x, {aspiration} the {SPEEDUP_ASPIRATION:.0f}x aspiration"
    )
    return _goal(goal, speedup >= MIN_SPEEDUP_OVER_OPD, detail)


def _margin_goal(goal: str, npd: float | None, other: float | None, min_lead: float, name: str) -> dict:
    """NPD's mean final accuracy at least ``other + min_lead``."""
    if npd is None or other is None:
        return _goal(goal, None, f"needs successful npd and {name.lower()} runs")
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
    lowered = " (lowered)" if target["lowered"] else ""
    lines += [
        f"- teacher accuracy: {_pct(results['teacher_accuracy'])}",
        f"- target: {_pct(target['accuracy'])}{lowered}: {target['reason']}",
        f"- target rule: {target['rule']}",
        "",
        "Training wall-clock (time to target, train wall, the plots) runs from the end of the initial "
        "validation and leaves out every validation pause; process wall is the whole run, start-up and "
        "validations included. Numbers are means over the seeds that ran, some with [min, max] and the "
        "sample standard deviation (sd). Tokens are prompt + response tokens trained on.",
        "",
    ]
    header = ["method", "seeds ok", "acc before", "acc final", "acc best", "time to target (s)", "train wall (s)"]
    header += ["validation (s)", "process wall (s)", "tokens", "trainer tok/s", "tok/s (wall)", "gen wait share"]
    header += ["packing eff.", "kept"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in results["methods"].items():
        if m["status"] == "skipped":
            row = [f"{name} ({m['label']})", f"skipped ({m['error']})"] + ["n/a"] * (len(header) - 2)
        elif m["status"] == "failed":
            logs = ", ".join(run["log"] for run in m["runs"])
            row = [f"{name} ({m['label']})", f"0/{len(m['runs'])} (see {logs})"] + ["n/a"] * (len(header) - 2)
        else:
            reached = f"{m['target_reached']}/{m['seeds_ok']} reached"
            row = [f"{name} ({m['label']})", f"{m['seeds_ok']}/{len(m['runs'])}", _stat(m["initial_accuracy"], "pct")]
            row += [_stat(m["final_accuracy"], "pct", "full"), _stat(m["best_accuracy"], "pct")]
            row += [f"{_stat(m['time_to_target_s'], '{:.0f}', 'full')} ({reached})"]
            row += [_stat(m["train_wall_s"], "{:.0f}", "range")]
            row += [_stat(m[key], "{:.0f}") for key in ("validation_s", "process_wall_s", "train_tokens")]
            row += [_stat(m[key], "{:.0f}") for key in ("trainer_tokens_per_s", "tokens_per_wall_s")]
            row += [_stat(m["wait_share"], "pct", "range")]
            row += [_stat(m[key], "pct") for key in ("packing_efficiency", "kept_fraction")]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Goals (benchmarks, not tests)", "", "| goal | met | detail |", "|---|---|---|"]
    for g in results["goals"]:
        met = "n/a" if g["met"] is None else ("yes" if g["met"] else "no")
        lines.append(f"| {g['goal']} | {met} | {g['detail']} |")
    lines += ["", "## Per seed", ""]
    header = ["method", "seed", "status", "acc final", "time to target (s)", "train wall (s)", "validation (s)"]
    header += ["process wall (s)", "gen wait share"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in results["methods"].items():
        for run in m.get("runs", []):
            row = [
                name,
                str(run["seed"]),
                run["status"] if run["status"] == "ok" else f"{run['status']} ({run['log']})",
            ]
            if run["status"] == "ok":
                row += [_pct(run["final_accuracy"]), _num(run["time_to_target_s"], "{:.0f}", "not reached")]
                row += [f"{run[key]:.0f}" for key in ("train_wall_s", "validation_s", "process_wall_s")]
                row.append(_pct(run["wait_share"]))
            else:
                row += ["n/a"] * (len(header) - 3)
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Plots: accuracy_vs_wallclock.png, accuracy_vs_tokens.png, time_breakdown.png", ""]
    return "\n".join(lines)


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

"""From the methods' runs to the verdict: time to a target accuracy, the issue's targets (met or
missed, by how much), ``results.json``, ``results.md`` and the plots."""

from __future__ import annotations

import json
import os
from typing import Any

# The target accuracy, as a share of the teacher's validation accuracy.
TARGET_SHARE_OF_TEACHER = 0.9
TARGET_DEFINITION = f"{TARGET_SHARE_OF_TEACHER:.0%} of the teacher's validation accuracy"
FALLBACK_DEFINITION = (
    "no method reached the target: the highest accuracy that every method which improved on the "
    "untrained student reaches (the lowest of their best accuracies)"
)
# The goals for NPD (benchmarks, not tests).
MIN_SPEEDUP_OVER_OPD = 3.0
MAX_ACCURACY_LOSS_TO_OPD = 0.01
MAX_WAIT_SHARE = 0.10
MIN_PACKING_EFFICIENCY = 0.97


def time_to(curve: list[dict], accuracy: float | None) -> float | None:
    """Wall-clock of the first validation at or above ``accuracy`` (None: never reached)."""
    if accuracy is None:
        return None
    return next((p["wall_s"] for p in curve if p["accuracy"] >= accuracy - 1e-9), None)


def summarize_method(run: dict) -> dict:
    """Accuracies, time shares and throughput of one successful run (``MethodRun.as_dict()``)."""
    accuracies = [p["accuracy"] for p in run["curve"]]
    wall = run["train_wall_s"]
    return {
        "initial_accuracy": accuracies[0] if accuracies else None,
        "final_accuracy": accuracies[-1] if accuracies else None,
        "best_accuracy": max(accuracies) if accuracies else None,
        "wait_share": run["breakdown_s"]["generation_wait"] / wall if wall else None,
        "tokens_per_wall_s": run["train_tokens"] / wall if wall else None,
    }


def build_results(settings: dict, teacher_accuracy: float | None, methods: dict[str, dict]) -> dict:
    """``methods``: name -> {label, status, returncode, process_wall_s, log, [run fields]}."""
    ok = {name: m for name, m in methods.items() if m["status"] == "ok"}
    for m in ok.values():
        m.update(summarize_method(m))
    target = None if teacher_accuracy is None else TARGET_SHARE_OF_TEACHER * teacher_accuracy
    for m in ok.values():
        m["time_to_target_s"] = time_to(m["curve"], target)
    fallback = None
    if all(m["time_to_target_s"] is None for m in ok.values()):
        improved = [m["best_accuracy"] for m in ok.values() if m["best_accuracy"] > m["initial_accuracy"]]
        fallback = min(improved) if improved else None
        for m in ok.values():
            m["time_to_fallback_s"] = time_to(m["curve"], fallback)
    results = {
        "settings": settings,
        "teacher_accuracy": teacher_accuracy,
        "target": {"accuracy": target, "definition": TARGET_DEFINITION},
        "fallback_target": None if fallback is None else {"accuracy": fallback, "definition": FALLBACK_DEFINITION},
        "methods": methods,
    }
    results["goals"] = check_goals(results)
    return results


def _goal(goal: str, met: bool | None, detail: str) -> dict:
    verdict = "n/a" if met is None else ("met" if met else "missed")
    return {"goal": goal, "met": met, "detail": f"{verdict}: {detail}"}


def check_goals(results: dict) -> list[dict]:
    methods = {n: m for n, m in results["methods"].items() if m["status"] == "ok"}
    npd, opd, sft = methods.get("npd"), methods.get("opd"), methods.get("sft")
    return [
        _speedup_goal(npd, opd, results["fallback_target"] is not None),
        _accuracy_goal(npd, opd, sft),
        _npd_limit_goal(npd, f"NPD trainer wait share < {MAX_WAIT_SHARE:.0%}", "wait_share", MAX_WAIT_SHARE, True),
        _npd_limit_goal(
            npd, f"NPD packing efficiency >= {MIN_PACKING_EFFICIENCY:.0%}", "packing_efficiency",
            MIN_PACKING_EFFICIENCY, False,
        ),  # fmt: skip
    ]


def _speedup_goal(npd: dict | None, opd: dict | None, have_fallback: bool) -> dict:
    """Time to the target (to the fallback target when NPD does not reach the target and one exists)."""
    goal = f"NPD reaches the target >= {MIN_SPEEDUP_OVER_OPD:.0f}x faster than verl's sync OPD"
    if npd is None or opd is None:
        return _goal(goal, None, "needs successful npd and opd runs")
    use_fallback = npd["time_to_target_s"] is None and have_fallback
    key, label = ("time_to_fallback_s", "fallback target") if use_fallback else ("time_to_target_s", "target")
    t_npd, t_opd = npd.get(key), opd.get(key)
    if t_npd is None:
        return _goal(goal, False, f"NPD never reached the {label}")
    if t_opd is None:
        # OPD ran out of steps first: its whole run is a lower bound on its time to the target.
        bound = opd["train_wall_s"] / max(t_npd, 1e-9)
        detail = f"OPD never reached the {label} in its {opd['train_wall_s']:.0f} s, NPD took {t_npd:.0f} s"
        return _goal(goal, bound >= MIN_SPEEDUP_OVER_OPD, f"{detail}: speedup >= {bound:.1f}x")
    speedup = t_opd / max(t_npd, 1e-9)
    detail = f"{speedup:.2f}x on the {label} (NPD {t_npd:.0f} s, OPD {t_opd:.0f} s)"
    return _goal(goal, speedup >= MIN_SPEEDUP_OVER_OPD, detail)


def _accuracy_goal(npd: dict | None, opd: dict | None, sft: dict | None) -> dict:
    goal = f"NPD final accuracy >= OPD - {100 * MAX_ACCURACY_LOSS_TO_OPD:.0f} pt and > SFT"
    if npd is None or opd is None or sft is None:
        return _goal(goal, None, "needs successful npd, opd and sft runs")
    final = {name: m["final_accuracy"] for name, m in (("npd", npd), ("opd", opd), ("sft", sft))}
    vs_opd = final["npd"] - (final["opd"] - MAX_ACCURACY_LOSS_TO_OPD)
    vs_sft = final["npd"] - final["sft"]
    detail = (
        f"NPD {_pct(final['npd'])}, OPD {_pct(final['opd'])} (margin {_pts(vs_opd)}), "
        f"SFT {_pct(final['sft'])} (margin {_pts(vs_sft)})"
    )
    return _goal(goal, vs_opd >= 0 and vs_sft > 0, detail)


def _npd_limit_goal(npd: dict | None, goal: str, key: str, limit: float, below: bool) -> dict:
    value = None if npd is None else npd.get(key)
    if value is None:
        return _goal(goal, None, f"needs a successful npd run that reports {key}")
    margin = limit - value if below else value - limit
    met = value < limit if below else value >= limit
    return _goal(goal, met, f"{_pct(value)} (margin {_pts(margin)})")


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
    settings, target, fallback = results["settings"], results["target"], results["fallback_target"]
    lines = ["# NPD vs verl's on-policy distillation vs SFT", ""]
    lines += [f"- {k}: {v}" for k, v in settings.items()]
    lines += [
        f"- teacher accuracy: {_pct(results['teacher_accuracy'])}",
        f"- target: {_pct(target['accuracy'])} ({target['definition']})",
    ]
    if fallback is not None:
        lines.append(f"- fallback target: {_pct(fallback['accuracy'])} ({fallback['definition']})")
    lines += [
        "",
        "Wall-clock is training time (after start-up and the initial validation, validations included); "
        "process wall includes start-up. Tokens are prompt + response tokens trained on.",
        "",
    ]
    header = ["method", "status", "acc before", "acc final", "acc best", "time to target (s)"]
    if fallback is not None:
        header.append("time to fallback (s)")
    header += ["train wall (s)", "process wall (s)", "tokens", "trainer tok/s", "tok/s (wall)"]
    header += ["gen wait share", "packing eff.", "kept"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in results["methods"].items():
        if m["status"] != "ok":
            why = f"rc {m['returncode']}, see {m['log']}" if m["status"] == "failed" else m["error"]
            row = [f"{name} ({m['label']})", f"{m['status']} ({why})"] + ["n/a"] * (len(header) - 2)
        else:
            row = [f"{name} ({m['label']})", "ok"]
            row += [_pct(m[key]) for key in ("initial_accuracy", "final_accuracy", "best_accuracy")]
            row.append(_num(m["time_to_target_s"], "{:.0f}", "not reached"))
            if fallback is not None:
                row.append(_num(m.get("time_to_fallback_s"), "{:.0f}", "not reached"))
            row += [
                f"{m['train_wall_s']:.0f}", f"{m['process_wall_s']:.0f}", f"{m['train_tokens']:.0f}",
                _num(m["trainer_tokens_per_s"], "{:.0f}"), _num(m["tokens_per_wall_s"], "{:.0f}"),
                _pct(m["wait_share"]), _pct(m["packing_efficiency"]), _pct(m["kept_fraction"]),
            ]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Goals (benchmarks, not tests)", "", "| goal | met | detail |", "|---|---|---|"]
    for g in results["goals"]:
        met = "n/a" if g["met"] is None else ("yes" if g["met"] else "no")
        lines.append(f"| {g['goal']} | {met} | {g['detail']} |")
    lines += ["", "Plots: accuracy_vs_wallclock.png, accuracy_vs_tokens.png, time_breakdown.png", ""]
    return "\n".join(lines)


def _ok_methods(results: dict) -> dict[str, dict]:
    return {n: m for n, m in results["methods"].items() if m["status"] == "ok"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(results: dict, out_dir: str) -> None:
    """Accuracy against wall-clock and against training tokens, every method on one chart each."""
    plt = _pyplot()
    for x_key, x_label, file_name in (
        ("wall_s", "training wall-clock (s)", "accuracy_vs_wallclock.png"),
        ("tokens", "training tokens (prompt + response)", "accuracy_vs_tokens.png"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, m in _ok_methods(results).items():
            ax.plot([p[x_key] for p in m["curve"]], [p["accuracy"] for p in m["curve"]], marker="o", label=m["label"])
        if results["teacher_accuracy"] is not None:
            ax.axhline(results["teacher_accuracy"], linestyle="--", color="gray", label="teacher")
        targets = ((results["target"], ":", "target"), (results["fallback_target"], "-.", "fallback target"))
        for target, style, label in targets:
            if target is not None and target["accuracy"] is not None:
                ax.axhline(target["accuracy"], linestyle=style, color="black", linewidth=0.8, label=label)
        ax.set_xlabel(x_label)
        ax.set_ylabel("validation accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, file_name), dpi=120)
        plt.close(fig)


def plot_time_breakdown(results: dict, out_dir: str) -> None:
    """Stacked bars per method: generation wait / train / sync / other seconds."""
    plt = _pyplot()
    methods = _ok_methods(results)
    parts = ("generation_wait", "train", "sync", "other")
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(methods)), 4.5))
    bottoms = [0.0] * len(methods)
    for part in parts:
        values = [m["breakdown_s"][part] for m in methods.values()]
        ax.bar(list(methods), values, bottom=bottoms, label=part.replace("_", " "))
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.set_ylabel("training wall-clock (s)")
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

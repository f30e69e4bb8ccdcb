"""``python -m verl_npd.bench``: the method commands, the verdict logic, and a miniature run.

The miniature runs one method per entry point (NPD, verl's main_ppo, verl's SFT trainer): each
method costs about 1.5 minutes of Ray start-up on 2 cores, so the other three (verl's
colocate_async and the two NPD ablations, which reuse the same entry points and readers) are
checked through their command lines here and run by the full benchmark.
"""

import json
import os

import pytest
import yaml
from conftest import run_module

from verl_npd.bench import report
from verl_npd.bench.methods import METHODS, method_command, select_methods
from verl_npd.bench.settings import TOY_MINI, Recipe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _command(name: str, run_dir: str = "/out/run") -> list[str]:
    (method,) = select_methods([name])
    return method_command(method, Recipe.toy_cpu(), TOY_MINI, "/data/val.parquet", run_dir).argv


def test_every_method_is_the_same_run_but_for_its_own_overrides():
    npd = _command("npd")
    assert npd[1:3] == ["-m", "verl_npd.main_npd"]
    for name, override in (("npd_no_filter", "npd.filter.enabled=false"), ("npd_sync1", "npd.sync_interval=1")):
        assert _command(name) == npd + [override]
    # verl's runs get the same scale: steps, batch, validation set and frequency.
    opd, opd_async = _command("opd"), _command("opd_async")
    assert opd[1:3] == ["-m", "verl.trainer.main_ppo"]
    for argv in (npd, opd, opd_async):
        for setting in ("data.train_batch_size=16", "trainer.test_freq=1", "data.val_files=/data/val.parquet"):
            assert setting in argv
    assert "npd.total_steps=2" in npd and "trainer.total_training_steps=2" in opd
    assert opd_async[: len(opd)] == opd
    assert opd_async[len(opd) :] == [
        "trainer.use_v1=true",
        "trainer.v1.trainer_mode=colocate_async",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
    ]


def test_unknown_method_is_rejected_with_the_known_ones():
    with pytest.raises(ValueError, match="npd_sync1"):
        select_methods(["npd", "ppo"])
    assert [m.name for m in select_methods(["sft", "npd"])] == ["sft", "npd"]
    assert len({m.name for m in METHODS}) == 6


def _run(accuracies, walls, wait=0.0, packing=None):
    curve = [
        {"step": i, "wall_s": w, "tokens": 100.0 * i, "accuracy": a} for i, (a, w) in enumerate(zip(accuracies, walls))
    ]
    return {
        "label": "x", "status": "ok", "returncode": 0, "process_wall_s": walls[-1] + 60, "log": "x/run.log",
        "curve": curve, "train_wall_s": walls[-1], "train_tokens": 100.0 * (len(curve) - 1),
        "breakdown_s": {"generation_wait": wait, "train": 1.0, "sync": 0.0, "other": walls[-1] - wait - 1.0},
        "trainer_tokens_per_s": 50.0, "packing_efficiency": packing, "kept_fraction": None,
    }  # fmt: skip


def test_goals_use_the_fallback_target_when_nobody_reaches_the_target():
    methods = {
        "npd": _run([0.3, 0.5, 0.6], [0, 10, 20], wait=1.0, packing=0.98),
        "opd": _run([0.3, 0.4, 0.5], [0, 40, 80]),
        "sft": _run([0.3, 0.35, 0.3], [0, 5, 10]),
    }
    results = report.build_results({}, teacher_accuracy=0.9, methods=methods)
    assert results["target"]["accuracy"] == pytest.approx(0.81)
    assert all(m["time_to_target_s"] is None for m in methods.values())
    # The lowest best accuracy of the methods that improved: SFT's 0.35.
    assert results["fallback_target"]["accuracy"] == pytest.approx(0.35)
    assert [methods[n]["time_to_fallback_s"] for n in ("npd", "opd", "sft")] == [10, 40, 5]
    speedup, final, wait, packing = results["goals"]
    assert speedup["met"] is True and "4.00x on the fallback target" in speedup["detail"]
    assert final["met"] is True and "margin +11.0 pt" in final["detail"]  # 0.6 - (0.5 - 0.01)
    assert wait["met"] is True and "5.0%" in wait["detail"]  # 1 s of 20
    assert packing["met"] is True


def test_speedup_is_a_lower_bound_when_opd_never_reaches_the_target():
    methods = {"npd": _run([0.3, 0.85], [0, 30]), "opd": _run([0.3, 0.5], [0, 60])}
    results = report.build_results({}, teacher_accuracy=0.9, methods=methods)
    assert results["fallback_target"] is None
    speedup, final, _, packing = results["goals"]
    assert speedup["met"] is False and "speedup >= 2.0x" in speedup["detail"]
    assert final["met"] is None  # no SFT run
    assert packing["met"] is None  # packing efficiency unknown


def test_mini_benchmark_npd_opd_sft(toy_world, tmp_path):
    out = tmp_path / "bench"
    result = run_module("verl_npd.bench", ["--mini", "--methods", "npd,opd,sft", "--out", str(out)], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    methods = results["methods"]
    assert list(methods) == ["npd", "opd", "sft"]
    for name, m in methods.items():
        assert m["status"] == "ok", (name, m.get("error"))
        # Validated before training and after each of the 2 steps (test_freq=1).
        assert [p["step"] for p in m["curve"]] == [0, 1, 2], name
        walls, tokens = [p["wall_s"] for p in m["curve"]], [p["tokens"] for p in m["curve"]]
        # NPD records its last step a moment after the last validation.
        assert walls[0] == 0 and walls[0] < walls[1] < walls[2] == pytest.approx(m["train_wall_s"], abs=0.5), name
        assert tokens[0] == 0 and tokens[0] < tokens[1] < tokens[2] == m["train_tokens"], name
        assert all(0 <= p["accuracy"] <= 1 for p in m["curve"])
        assert m["process_wall_s"] > m["train_wall_s"] > 0
        assert all(v >= 0 for v in m["breakdown_s"].values())
        assert sum(m["breakdown_s"].values()) == pytest.approx(m["train_wall_s"])
        assert m["breakdown_s"]["train"] > 0 and m["trainer_tokens_per_s"] > 0
    # One untrained student, one validation set, one greedy exact-match: the same starting accuracy
    # whether measured by verl's validation (NPD, OPD) or by the benchmark (SFT checkpoints).
    assert len({m["initial_accuracy"] for m in methods.values()}) == 1
    assert methods["npd"]["breakdown_s"]["sync"] > 0 and methods["opd"]["breakdown_s"]["sync"] > 0
    assert 0 < methods["npd"]["packing_efficiency"] <= 1 and 0 < methods["npd"]["kept_fraction"] <= 1
    assert methods["sft"]["breakdown_s"]["generation_wait"] == methods["sft"]["teacher_generation_s"] > 0
    # Every method sees 2 steps x 16 samples; SFT trains on 32 teacher responses, with NPD's lr.
    assert results["teacher_accuracy"] > 0.9
    assert results["target"]["accuracy"] == pytest.approx(0.9 * results["teacher_accuracy"])
    assert all(isinstance(g["met"], bool) for g in results["goals"]), results["goals"]

    def composed(name):
        with open(out / name / "hydra" / ".hydra" / "config.yaml") as f:
            return yaml.safe_load(f)

    npd_optim, sft_config = composed("npd")["actor_rollout_ref"]["actor"]["optim"], composed("sft")
    for key in ("lr", "weight_decay", "clip_grad", "betas"):
        assert sft_config["optim"][key] == npd_optim[key], key
    assert sft_config["data"]["train_batch_size"] == 16
    timeline = [json.loads(line) for line in (out / "sft" / "timeline.jsonl").read_text().splitlines()]
    assert [row["step"] for row in timeline] == [1, 2]

    markdown = (out / "results.md").read_text()
    for name in methods:
        assert f"| {name} (" in markdown
    assert "## Goals" in markdown
    assert markdown.strip() in result.stdout  # printed at the end
    for png in ("accuracy_vs_wallclock.png", "accuracy_vs_tokens.png", "time_breakdown.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    assert os.path.exists(out / "data" / "teacher_responses_32.parquet")

"""``python -m verl_npd.bench``: what the benchmark measures, checked against hand-computed numbers
(readers on synthetic outputs with known validation pauses, time to target, mean and spread over
seeds, the target rule, the goals), and one miniature end-to-end run.

The miniature runs one method per entry point (NPD, verl's main_ppo, verl's SFT trainer) with one
seed: each Ray run costs about 1.5 minutes of start-up on 2 cores, so verl's colocate_async and the
NPD ablations, which reuse the same entry points and readers, are run by the full benchmark. So is
npd_remote_teacher, whose own parts (its config against npd's, the served teacher's start, thread
share and stop) are checked here without Ray.
"""

import json
import math
import os
import subprocess
import urllib.request

import pytest
import yaml
from conftest import compose, run_module
from omegaconf import OmegaConf

from verl_npd.bench import readers, report
from verl_npd.bench.methods import (
    SERVED_TEACHER_NAME,
    SFT_OPTIM_KEYS,
    free_port,
    method_command,
    run_overrides,
    select_methods,
    served_teacher_command,
)
from verl_npd.bench.runner import Benchmark, serving
from verl_npd.bench.settings import TOY_FULL, TOY_MINI, Recipe
from verl_npd.bench.toy_data import sampled_prompt_order

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ACC_KEY = "val-core/toy/acc/mean@1"


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


# ---- readers: training time leaves the validation pauses out -------------------------------------


def test_npd_training_time_leaves_out_the_initial_validation_and_every_validation_pause(tmp_path):
    # summary.py's clock: the initial validation ends at 20 s. Steps take 2 s of training each; steps 2
    # and 4 are then validated for 5 s and 6 s, before their row is written.
    summary = {
        "validations": [
            {"step": 0, "wall_s": 20.0, "accuracy": 0.3},
            {"step": 2, "wall_s": 29.0, "accuracy": 0.5},
            {"step": 4, "wall_s": 39.0, "accuracy": 0.7},
        ],
        "packing_efficiency": 0.9,
        "kept_fraction": 0.875,
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    step = {"timing/wait_gen": 0.5, "timing/train": 1.0, "timing/sync": 0.25, "perf/train_tokens": 100.0}
    # Teacher scoring per wave: steps 1, 2 and 4 saw waves finish (0.2, 0.4, 0.9 s), step 3 none.
    _write_jsonl(
        tmp_path / "metrics.jsonl",
        [
            {"step": 1, "wall_s": 22.0, **step, "timing/teacher": 0.2},
            {"step": 2, "wall_s": 29.0, **step, ACC_KEY: 0.5, "timing/validation": 5.0, "timing/teacher": 0.4},
            {"step": 3, "wall_s": 31.0, **step},
            {"step": 4, "wall_s": 39.0, **step, ACC_KEY: 0.7, "timing/validation": 6.0, "timing/teacher": 0.9},
        ],
    )
    run = readers.read_npd(str(tmp_path))
    assert run.curve == [
        {"step": 0, "wall_s": 0.0, "tokens": 0.0, "accuracy": 0.3},
        {"step": 2, "wall_s": 4.0, "tokens": 200.0, "accuracy": 0.5},  # 29 - 20 - 5
        {"step": 4, "wall_s": 8.0, "tokens": 400.0, "accuracy": 0.7},  # 39 - 20 - 5 - 6
    ]
    assert run.train_wall_s == 8.0 and run.validation_s == 11.0 and run.train_tokens == 400.0
    assert run.breakdown_s == {"generation_wait": 2.0, "train": 4.0, "sync": 1.0, "other": 1.0}
    assert run.trainer_tokens_per_s == 100.0 and run.packing_efficiency == 0.9 and run.kept_fraction == 0.875
    assert run.teacher_s_per_wave == pytest.approx(0.5)


def test_npd_reader_refuses_a_validated_step_without_its_validation_time(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"validations": [{"step": 0, "wall_s": 1.0, "accuracy": 0.3}]}))
    _write_jsonl(tmp_path / "metrics.jsonl", [{"step": 1, "wall_s": 9.0, ACC_KEY: 0.4}])
    with pytest.raises(ValueError, match="step 1 was validated but has no timing/validation"):
        readers.read_npd(str(tmp_path))


def test_verl_training_time_is_the_sum_of_its_step_timers_without_testing(tmp_path):
    def row(step, **data):
        return {"step": step, "data": data}

    step = {"timing_s/step": 3.0, "timing_s/gen": 1.0, "timing_s/update_actor": 1.5, "timing_s/update_weights": 0.25}
    step["perf/total_num_tokens"] = 50.0
    _write_jsonl(
        tmp_path / "metrics.jsonl",
        [
            row(0, **{ACC_KEY: 0.3}),
            row(1, **step),
            row(2, **step, **{ACC_KEY: 0.6, "timing_s/testing": 7.0}),
            row(3, **step, **{ACC_KEY: 0.65, "timing_s/testing": 8.0}),
        ],
    )
    run = readers.read_verl(str(tmp_path))
    assert [(p["step"], p["wall_s"], p["tokens"], p["accuracy"]) for p in run.curve] == [
        (0, 0.0, 0.0, 0.3),
        (2, 6.0, 100.0, 0.6),
        (3, 9.0, 150.0, 0.65),
    ]
    assert run.train_wall_s == 9.0 and run.validation_s == 15.0
    assert run.breakdown_s == {"generation_wait": 3.0, "train": 4.5, "sync": 0.75, "other": 0.75}


def test_sft_training_time_is_the_teacher_generation_and_the_updates_without_evaluations(tmp_path):
    # timeline wall_s already leaves checkpoint saves out (sft_trainer.py).
    _write_jsonl(
        tmp_path / "timeline.jsonl",
        [{"step": s, "wall_s": 1.5 * s, "train_s": 1.0, "tokens": 10} for s in (1, 2, 3, 4)],
    )
    evaluations = [{"step": s, "accuracy": 0.3 + 0.1 * s, "eval_s": 2.0} for s in (0, 2, 4)]
    (tmp_path / "evaluations.json").write_text(json.dumps(evaluations))
    run = readers.read_sft(str(tmp_path), teacher_generation_s=4.0)
    assert [(p["step"], p["wall_s"], p["tokens"]) for p in run.curve] == [(0, 0.0, 0), (2, 7.0, 20), (4, 10.0, 40)]
    assert run.train_wall_s == 10.0 and run.validation_s == 4.0  # the untrained student's evaluation is not counted
    assert run.breakdown_s == {"generation_wait": 4.0, "train": 4.0, "sync": 0.0, "other": 2.0}


# ---- time to target, mean and spread, the target rule ---------------------------------------------


def _curve(accuracies, walls):
    return [
        {"step": 5 * i, "wall_s": float(w), "tokens": 100.0 * i, "accuracy": a}
        for i, (a, w) in enumerate(zip(accuracies, walls))
    ]


def test_time_to_target_is_the_first_validation_at_or_above_it_that_the_next_one_confirms():
    curve = _curve([0.3, 0.5, 0.8, 0.7, 0.85, 0.9, 0.95], [0, 10, 20, 30, 40, 50, 60])
    assert report.time_to(curve, 0.5) == 10.0  # reached exactly, not only when exceeded
    assert report.time_to(curve, 0.75) == 40.0  # 20 s is not confirmed: the next validation dips to 0.7
    assert report.time_to(curve, 0.7) == 20.0
    assert report.time_to(curve, 0.9) == 50.0
    # Reached only at the last validation, with no next one to confirm it: not reached.
    assert report.time_to(curve, 0.95) is None and report.time_to(curve, None) is None


def test_final_accuracy_is_the_mean_of_the_last_three_validations():
    assert report.final_accuracy(_curve([0.3, 0.5, 0.8, 0.7, 0.9], range(5))) == pytest.approx(0.8)
    # Fewer trained validations than three: those there are (never the untrained student's).
    assert report.final_accuracy(_curve([0.3, 0.5, 0.7], range(3))) == pytest.approx(0.6)
    assert report.final_accuracy(_curve([0.3], [0])) == pytest.approx(0.3)


def test_spread_and_mean_curve_over_seeds():
    stats = report.spread([10.0, None, 20.0, 36.0])
    assert stats["n"] == 3 and stats["mean"] == 22.0 and (stats["min"], stats["max"]) == (10.0, 36.0)
    assert stats["std"] == pytest.approx(math.sqrt((12**2 + 2**2 + 14**2) / 2))
    assert report.spread([5.0]) == {"mean": 5.0, "std": None, "min": 5.0, "max": 5.0, "n": 1}
    assert report.spread([None]) is None

    seed_a = _curve([0.3, 0.5, 0.7], [0, 10, 20])
    seed_b = _curve([0.3, 0.6, 0.8, 0.9], [0, 14, 30, 40])  # one more validation than seed_a
    mean = report.mean_curve([seed_a, seed_b])
    assert [(p["step"], p["wall_s"], p["tokens"]) for p in mean] == [(0, 0.0, 0.0), (5, 12.0, 100.0), (10, 25.0, 200.0)]
    assert [p["accuracy"] for p in mean] == pytest.approx([0.3, 0.55, 0.75])
    assert [(p["accuracy_min"], p["accuracy_max"]) for p in mean] == [(0.3, 0.3), (0.5, 0.6), (0.7, 0.8)]


def test_target_is_ninety_percent_of_the_teacher_and_never_lowered():
    target = report.choose_target(0.96)
    assert target["accuracy"] == pytest.approx(0.864) and "90% of the teacher's 96.0%" in target["reason"]
    # Unknown teacher accuracy (a GPU recipe without --teacher-accuracy): nothing is timed.
    assert report.choose_target(None)["accuracy"] is None


# ---- the verdict over seeds -----------------------------------------------------------------------


def _run(seed, accuracies, walls, wait=0.0):
    return {
        "seed": seed, "status": "ok", "returncode": 0, "process_wall_s": walls[-1] + 100.0,
        "log": f"x/seed{seed}/run.log", "curve": _curve(accuracies, walls), "train_wall_s": float(walls[-1]),
        "validation_s": 30.0,
        "train_tokens": 100.0 * (len(walls) - 1),
        "breakdown_s": {"generation_wait": wait, "train": 1.0, "sync": 0.0, "other": walls[-1] - wait - 1.0},
        "trainer_tokens_per_s": 50.0, "packing_efficiency": None, "kept_fraction": None,
    }  # fmt: skip


def _method(label, *runs, opd_mode=False):
    return {"label": label, "opd_mode": opd_mode, "runs": list(runs), "threads": 1}


def test_results_report_mean_and_spread_and_the_goals_by_how_much():
    # Teacher 90%: target 81%, confirmed by the validation after. The fastest OPD mode (async) reaches
    # it at 30, 33 and 36 s (mean 33), sync OPD at 60 s each (its 81% at 60 s is confirmed at 90 s); NPD at 10, 11 and 12 s (mean 11): 3.0x
    # the fastest. Final accuracies (mean of the last 3 validations): NPD 0.82, 0.83, 0.84 (mean 83%);
    # sync OPD 0.81 each; async OPD 0.84, 0.85, 0.83 (mean 84%, the best OPD mode); SFT 0.77 each.
    # NPD wait shares 2/20, 3/20, 4/20 (mean 15%).
    methods = {
        "npd": _method(
            "NPD",
            _run(1, [0.3, 0.81, 0.82, 0.83], [0, 10, 15, 20], wait=2.0),
            _run(2, [0.3, 0.7, 0.82, 0.83, 0.84], [0, 6, 11, 16, 20], wait=3.0),
            _run(3, [0.3, 0.81, 0.85, 0.86], [0, 12, 16, 20], wait=4.0),
        ),
        "opd": _method(
            "OPD sync",
            *(_run(seed, [0.3, 0.5, 0.81, 0.82, 0.8], [0, 30, 60, 90, 100]) for seed in (1, 2, 3)),
            opd_mode=True,
        ),
        "opd_async": _method(
            "OPD async",
            _run(1, [0.3, 0.82, 0.84, 0.84, 0.84], [0, 30, 40, 50, 60]),
            _run(2, [0.3, 0.81, 0.85, 0.85, 0.85], [0, 33, 40, 50, 60]),
            _run(3, [0.3, 0.81, 0.83, 0.83, 0.83], [0, 36, 40, 50, 60]),
            opd_mode=True,
        ),
        "sft": _method("SFT", *(_run(seed, [0.3, 0.77], [0, 5]) for seed in (1, 2, 3))),
    }
    # NPD's teacher scoring per wave: 0.1, 0.2 and 0.3 s (verl's runs report none).
    for run, seconds in zip(methods["npd"]["runs"], (0.1, 0.2, 0.3), strict=True):
        run["teacher_s_per_wave"] = seconds
    results = report.build_results({}, teacher_accuracy=0.9, methods=methods)
    assert results["target"]["accuracy"] == pytest.approx(0.81)
    npd, opd = methods["npd"], methods["opd_async"]
    assert npd["teacher_s_per_wave"]["mean"] == pytest.approx(0.2) and opd["teacher_s_per_wave"] is None
    assert [run["time_to_target_s"] for run in npd["runs"]] == [10.0, 11.0, 12.0]
    assert npd["time_to_target_s"]["mean"] == 11.0 and npd["time_to_target_s"]["std"] == pytest.approx(1.0)
    assert opd["time_to_target_s"]["mean"] == 33.0 and npd["target_reached"] == opd["target_reached"] == 3
    assert npd["final_accuracy"]["mean"] == pytest.approx(0.83)
    assert npd["final_accuracy"]["min"] == pytest.approx(0.82) and npd["final_accuracy"]["max"] == pytest.approx(0.84)
    assert npd["last_accuracy"]["mean"] == pytest.approx(0.8433333) and npd["best_accuracy"]["max"] == 0.86
    assert npd["wait_share"]["mean"] == pytest.approx(0.15) and npd["status"] == "ok"
    speedup, vs_opd, vs_sft, wait = results["goals"]
    assert speedup["met"] is True and "fastest opd_async: 3.00x" in speedup["detail"], speedup
    assert "opd 5.45x (3/3 seeds reached)" in speedup["detail"]
    assert vs_opd["met"] is True and "opd_async 84.0%: margin +0.0 pt" in vs_opd["detail"]  # 83 - (84 - 1)
    assert vs_sft["met"] is True and "SFT 77.0%: margin +1.0 pt" in vs_sft["detail"]  # 83 - (77 + 5)
    assert wait["met"] is False and "15.0%: margin -5.0 pt" in wait["detail"]

    markdown = report.format_markdown(results)
    assert "| npd (NPD) | 3/3 | 1 | 30.0% | 83.0% [82.0%, 84.0%] sd 1.0 pt | 84.3% | 84.3% | 11 [10, 12] sd 1 (3/3 reached) |" in markdown
    assert "| npd | 2 | ok | 83.0% | 84.0% | 84.0% | 11 | 20 | 30 | 120 | 15.0% | 0.200 |" in markdown
    assert "| n/a | 0.200 |" in markdown and "| opd_async | 1 | ok | 84.0% | 84.0% | 84.0% | 30 | 60 | 30 | 160 | 0.0% | n/a |" in markdown


def test_a_mode_that_never_reaches_the_target_bounds_the_speedup_from_below():
    # Sync OPD: seed 1 reaches the target at 80 s, seed 2 never does in its 100 s: its time is at
    # least (80 + 100) / 2 = 90 s, and NPD's 10 s gives at least 9x.
    methods = {
        "npd": _method("NPD", *(_run(seed, [0.3, 0.85, 0.86], [0, 10, 20]) for seed in (1, 2))),
        "opd": _method(
            "OPD", _run(1, [0.3, 0.85, 0.86], [0, 80, 100]), _run(2, [0.3, 0.7, 0.75], [0, 80, 100]), opd_mode=True
        ),
    }
    results = report.build_results({}, teacher_accuracy=0.9, methods=methods)
    opd = results["methods"]["opd"]
    assert opd["target_reached"] == 1 and opd["time_to_target_s"]["mean"] == 80.0
    assert opd["time_to_target_bound_s"]["mean"] == 90.0
    speedup = results["goals"][0]
    assert speedup["met"] is True and "fastest opd: >= 9.00x" in speedup["detail"], speedup
    assert "(2/2 reached)" in report.format_markdown(results) and "(1/2 reached), bound 90" in report.format_markdown(results)
    # A bound below the goal says nothing either way.
    methods["npd"] = _method("NPD", *(_run(seed, [0.3, 0.85, 0.86], [0, 40, 50]) for seed in (1, 2)))
    results = report.build_results({}, teacher_accuracy=0.9, methods=methods)
    assert results["goals"][0]["met"] is None and "undetermined" in results["goals"][0]["detail"]


def test_speedup_goal_is_missed_when_an_npd_seed_never_reaches_the_target():
    methods = {
        "npd": _method("NPD", _run(1, [0.3, 0.81, 0.82], [0, 10, 20]), _run(2, [0.3, 0.79, 0.78], [0, 10, 20])),
        "opd": _method(
            "OPD", _run(1, [0.3, 0.82, 0.84], [0, 40, 50]), _run(2, [0.3, 0.85, 0.85], [0, 40, 50]), opd_mode=True
        ),
    }
    results = report.build_results({}, teacher_accuracy=0.9, methods=methods)
    speedup, vs_opd, vs_sft, _ = results["goals"]
    assert speedup["met"] is False and "NPD reached the target in 1 of 2 seeds" in speedup["detail"]
    # NPD 80.0% against OPD 84.0%: 3 pt short of the 1 pt allowance.
    assert vs_opd["met"] is False and "margin -3.0 pt" in vs_opd["detail"]
    assert vs_sft["met"] is None  # no SFT run


def test_a_failed_seed_is_reported_and_left_out_of_the_mean():
    failed = {"seed": 2, "status": "failed", "returncode": 1, "process_wall_s": 5.0, "log": "npd/seed2/run.log"}
    methods = {"npd": _method("NPD", _run(1, [0.3, 0.6], [0, 10]), failed)}
    results = report.build_results({}, teacher_accuracy=0.9, methods=methods)
    npd = results["methods"]["npd"]
    assert npd["status"] == "partial" and npd["seeds_ok"] == 1 and npd["final_accuracy"]["mean"] == 0.6
    assert "| npd | 2 | failed (npd/seed2/run.log) |" in report.format_markdown(results)


# ---- what a seed varies, and that every method gets it ---------------------------------------------


@pytest.mark.parametrize("scale", [TOY_FULL, TOY_MINI], ids=["full", "mini"])
def test_every_method_gets_the_same_seed_run_size_and_training_settings(scale):
    """Each trainer counts a run in its own terms (verl's asynchronous modes: a step is a weight sync
    of 2 updates; fully_async: a budget of prompts): composed with the benchmark's overrides, every
    method trains the same number of optimizer steps of the same prompts per step, validates as
    often, and agrees with NPD on everything the comparison depends on."""
    recipe = Recipe.toy_cpu()
    npd = compose(recipe.npd_config_dir, recipe.npd_config_name, run_overrides(scale, "/v.parquet", 2))
    prompts = npd.data.train_batch_size
    assert npd.trainer.total_training_steps == scale.steps and npd.trainer.test_freq == scale.test_freq
    for method in select_methods(["opd", "opd_separate_async", "opd_fully_async", "opd_colocate_async"]):
        overrides = run_overrides(scale, "/v.parquet", 2, method=method, prompts_per_step=prompts)
        opd = compose(recipe.opd_config_dir, method.opd_config, overrides)
        assert opd.data.seed == 2 and opd.actor_rollout_ref.rollout.seed == 2 and opd.data.val_files == "/v.parquet"
        actor = opd.actor_rollout_ref.actor
        if method.name == "opd_separate_async":
            sync_every = opd.trainer.v1.separate_async.parameter_sync_step
            steps, per_step = opd.trainer.total_training_steps * sync_every, actor.ppo_mini_batch_size
            assert opd.data.train_batch_size == sync_every * per_step  # verl's own assertion
        elif method.name == "opd_fully_async":
            sync_every = opd.async_training.trigger_parameter_sync_step
            per_step = actor.ppo_mini_batch_size * opd.async_training.require_batches
            steps = opd.rollout.total_rollout_steps // per_step
            assert actor.optim.total_training_steps == opd.trainer.total_training_steps == steps  # the lr horizon
        else:
            sync_every, steps, per_step = 1, opd.trainer.total_training_steps, opd.data.train_batch_size
        assert sync_every == method.updates_per_step, method.name
        assert (steps, per_step, opd.trainer.test_freq * sync_every) == (scale.steps, prompts, scale.test_freq), method.name
        # Nothing is tuned per method: the recipes agree on everything the comparison depends on.
        for key in (
            "data.max_prompt_length", "data.max_response_length", "actor_rollout_ref.actor.optim.lr",
            "actor_rollout_ref.actor.optim.lr_scheduler_type", "actor_rollout_ref.actor.optim.min_lr_ratio",
            "actor_rollout_ref.actor.optim.weight_decay", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu",
            "actor_rollout_ref.rollout.temperature", "distillation.distillation_loss.loss_mode",
            "distillation.distillation_loss.topk", "algorithm.rollout_correction.bypass_mode",
        ):  # fmt: skip
            assert OmegaConf.select(npd, key) == OmegaConf.select(opd, key), (method.name, key)


def _flat(tree, prefix=""):
    """A nested dict as {"a.b.c": leaf}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}.{key}".lstrip(".")).items()}


def test_served_teacher_run_differs_from_npd_only_in_where_its_teacher_is(tmp_path):
    recipe = Recipe.toy_cpu()
    npd, remote = select_methods(["npd", "npd_remote_teacher"])
    url = "http://127.0.0.1:8123/v1"
    configs = []
    for method, teacher_url in ((npd, None), (remote, url)):
        argv = method_command(method, recipe, TOY_FULL, "/v.parquet", 2, str(tmp_path), teacher_url).argv
        overrides = argv[argv.index("--config-name") + 2 :]
        composed = compose(recipe.npd_config_dir, recipe.npd_config_name, overrides)
        configs.append(_flat(OmegaConf.to_container(composed)))
    differences = {key: (configs[0].get(key), configs[1].get(key)) for key in configs[0].keys() | configs[1].keys()}
    differences = {key: pair for key, pair in differences.items() if pair[0] != pair[1]}
    # The same teacher (distillation.*), seed, run size and training settings; the job scores at the
    # URL and reserves no logical GPU for the teacher.
    assert differences == {
        "npd.teacher.url": (None, url),
        "npd.teacher.model": (None, SERVED_TEACHER_NAME),
        "ray_kwargs.ray_init.num_gpus": (2, 1),
    }


def test_cross_tokenizer_runs_differ_from_npd_and_sft_only_in_their_teacher(tmp_path):
    from verl_npd.toy import ensure_toy_world
    from verl_npd.toy.cross import ensure_cross_teacher

    recipe = Recipe.toy_cpu()
    npd, cross_npd, cross_sft = select_methods(["npd", "npd_cross_tokenizer", "sft_cross_tokenizer"])
    configs = []
    for method in (npd, cross_npd):
        argv = method_command(method, recipe, TOY_FULL, "/v.parquet", 2, str(tmp_path)).argv
        overrides = argv[argv.index("--config-name") + 2 :]
        composed = compose(recipe.npd_config_dir, recipe.npd_config_name, overrides)
        configs.append(_flat(OmegaConf.to_container(composed, resolve=True)))
    differences = {key: (configs[0].get(key), configs[1].get(key)) for key in configs[0].keys() | configs[1].keys()}
    differences = {key: pair for key, pair in differences.items() if pair[0] != pair[1]}
    teacher_path = "distillation.teacher_models.teacher_model.model_path"
    assert differences == {
        teacher_path: (ensure_toy_world().teacher_dir, ensure_cross_teacher().teacher_dir),
        "npd.cross_tokenizer.enabled": (False, True),
    }
    # SFT reads its teacher from the NPD config the benchmark composes for it.
    bench = Benchmark(recipe, TOY_FULL, [cross_sft], str(tmp_path))
    assert OmegaConf.select(bench._npd_config(2, method=cross_sft), teacher_path) == ensure_cross_teacher().teacher_dir
    assert OmegaConf.select(bench._npd_config(2), teacher_path) == ensure_toy_world().teacher_dir


def test_served_teacher_is_the_toy_teacher_with_the_methods_threads_and_is_stopped_after(
    toy_world, tmp_path, monkeypatch
):
    import asyncio

    import torch
    from test_remote_teacher import _forward_scores, http_teacher
    from transformers import AutoModelForCausalLM

    from verl_npd.bench import runner

    # On 12 cores an NPD job with a teacher replica runs 3 processes (trainer, the student's rollout
    # server, the teacher's server): the default share is 4 threads each, and "auto" tries that and
    # all 12. A served teacher runs with its method's threads, as a replica in the job would.
    monkeypatch.setattr(runner, "node_cores", lambda: 12)
    bench = Benchmark(
        Recipe.toy_cpu(), TOY_MINI, select_methods(["npd_remote_teacher"]), str(tmp_path), threads="auto"
    )
    assert bench._thread_splits() == [4, 12]

    def answers(url):
        try:
            with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=5):
                return True
        except OSError:
            return False

    sequence = list(range(3, 20))
    # Stopped however the run ends: here by Ctrl-C.
    with pytest.raises(KeyboardInterrupt):
        with bench.served_teacher(seed=1, run_dir=str(tmp_path), threads=4) as (url, start_s):
            assert url.startswith("http://127.0.0.1:") and start_s > 0
            teacher = http_teacher(url, model=SERVED_TEACHER_NAME, max_wait_s=30)
            served = asyncio.run(teacher.score([sequence], 4))[0]
            raise KeyboardInterrupt
    assert not answers(url)
    assert "4 torch threads" in (tmp_path / "teacher_server.log").read_text()
    model = AutoModelForCausalLM.from_pretrained(toy_world.teacher_dir, dtype=torch.float32).eval()
    ids, values, actual = _forward_scores(model, sequence, 4)
    torch.testing.assert_close(served.topk_ids[:-1], ids.int(), rtol=0, atol=0)
    torch.testing.assert_close(served.topk_log_probs[:-1], values, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor(served.token_log_probs), actual, rtol=0, atol=1e-4)


def test_a_served_teacher_that_does_not_start_fails_naming_its_url_and_why(tmp_path):
    port = free_port()
    command = served_teacher_command(str(tmp_path / "no-model"), port)
    message = rf"the server at http://127.0.0.1:{port} exited with 2:\n(.|\n)*no-model is not a directory"
    with pytest.raises(RuntimeError, match=message):
        with serving(command, port, str(tmp_path / "server.log")):
            pass


def test_sft_prompts_are_seeded_epochs_of_the_whole_training_set():
    order = sampled_prompt_order(10, 25, seed=1)
    assert len(order) == 25
    assert sorted(order[:10]) == sorted(order[10:20]) == list(range(10)) and len(set(order[20:])) == 5
    assert order == sampled_prompt_order(10, 25, seed=1)
    assert order != sampled_prompt_order(10, 25, seed=2)


# ---- the miniature, end to end --------------------------------------------------------------------


def test_mini_benchmark_npd_opd_sft(toy_world, tmp_path):
    out = tmp_path / "bench"
    result = run_module("verl_npd.bench", ["--mini", "--out", str(out)], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    methods = results["methods"]
    assert list(methods) == ["npd", "opd", "opd_separate_async", "opd_fully_async", "sft"]  # the default methods
    assert results["settings"]["seeds"] == [1]
    for name, m in methods.items():
        assert m["status"] == "ok" and m["seeds_ok"] == 1, (name, [r.get("error") for r in m["runs"]])
        (run,) = m["runs"]
        assert run["seed"] == 1 and os.path.isfile(out / run["log"])
        # Validated before training and after the 2 steps (test_freq=2).
        assert [p["step"] for p in run["curve"]] == [0, 2], name
        walls, tokens = [p["wall_s"] for p in run["curve"]], [p["tokens"] for p in run["curve"]]
        assert walls[0] == 0 < walls[1] == pytest.approx(run["train_wall_s"]), name
        assert tokens[0] == 0 < tokens[1] == run["train_tokens"], name
        # Each validation took time, all of it outside the training time and inside the process's.
        assert run["validation_s"] > 0 and run["process_wall_s"] > run["train_wall_s"] + run["validation_s"], name
        assert all(v >= 0 for v in run["breakdown_s"].values())
        assert sum(run["breakdown_s"].values()) == pytest.approx(run["train_wall_s"])
        assert run["breakdown_s"]["train"] > 0 and run["trainer_tokens_per_s"] > 0
        assert m["final_accuracy"]["mean"] == run["curve"][-1]["accuracy"]
    # One untrained student, one validation set, one greedy exact-match: the same starting accuracy
    # whether measured by verl's validation (NPD, OPD) or by the benchmark (SFT checkpoints).
    assert len({m["runs"][0]["curve"][0]["accuracy"] for m in methods.values()}) == 1
    npd, opd, sft = (methods[n]["runs"][0] for n in ("npd", "opd", "sft"))
    assert npd["breakdown_s"]["sync"] > 0 and opd["breakdown_s"]["sync"] > 0
    assert 0 < npd["packing_efficiency"] <= 1 and 0 < npd["kept_fraction"] <= 1
    assert sft["breakdown_s"]["generation_wait"] == sft["teacher_generation_s"] > 0
    assert results["teacher_accuracy"] > 0.9
    assert len(results["goals"]) == 4

    def composed(name):
        with open(out / name / "seed1" / "hydra" / ".hydra" / "config.yaml") as f:
            return yaml.safe_load(f)

    # Both Ray runs ran with seed 1 (verl's own rollout seed is 42).
    for name in ("npd", "opd"):
        config = composed(name)
        assert config["data"]["seed"] == 1 and config["actor_rollout_ref"]["rollout"]["seed"] == 1, name
    # SFT trained with NPD's optimiser and batch, on 2 steps x 16 teacher responses of seed 1.
    npd_optim, sft_config = composed("npd")["actor_rollout_ref"]["actor"]["optim"], composed("sft")
    for key in (*SFT_OPTIM_KEYS, "betas"):
        assert sft_config["optim"][key] == npd_optim[key], key
    assert sft_config["optim"]["lr_scheduler_type"] == "cosine"  # the toy's schedule, over the same steps
    assert sft_config["trainer"]["total_training_steps"] == composed("npd")["trainer"]["total_training_steps"] == 2
    assert sft_config["data"]["train_batch_size"] == 16
    timeline = [json.loads(line) for line in (out / "sft" / "seed1" / "timeline.jsonl").read_text().splitlines()]
    assert [row["step"] for row in timeline] == [1, 2]
    assert os.path.exists(out / "data" / "teacher_responses_32_seed1.parquet")

    markdown = (out / "results.md").read_text()
    assert "## Goals" in markdown and "## Per seed" in markdown
    assert markdown.strip() in result.stdout  # printed at the end
    for png in ("accuracy_vs_wallclock.png", "accuracy_vs_tokens.png", "time_breakdown.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC


# ---- thread trials, provenance, the validation set, one wait share ---------------------------------


def test_each_method_keeps_the_thread_split_its_trial_ran_fastest_with(tmp_path, monkeypatch):
    """The trials run each method with each split for the trial's steps without validation; the seeds
    then run with the split of least training time per step, and the results record every trial."""
    per_step = {("npd", 1): 0.6, ("npd", 2): 0.7, ("opd", 1): 1.8, ("opd", 2): 1.2}
    calls = []

    def fake_run(self, method, seed, desc, run_dir, threads, trial=False):
        calls.append((method.name, seed, threads, trial))
        if trial:
            return {"status": "ok", "process_wall_s": 9.0, "train_s_per_step": per_step[method.name, threads]}
        return {"seed": seed, "status": "failed", "returncode": 1, "process_wall_s": 1.0, "log": "x"}

    monkeypatch.setattr(Benchmark, "_run_method", fake_run)
    monkeypatch.setattr(Benchmark, "_prepare_toy", lambda self: None)
    bench = Benchmark(Recipe.toy_cpu(), TOY_MINI, select_methods(["npd", "opd"]), str(tmp_path), threads=[1, 2])
    results = bench.run()
    assert calls[:4] == [("npd", 1, 1, True), ("npd", 1, 2, True), ("opd", 1, 1, True), ("opd", 1, 2, True)]
    assert calls[4:] == [("npd", 1, 1, False), ("opd", 1, 2, False)]
    assert results["methods"]["npd"]["threads"] == 1 and results["methods"]["opd"]["threads"] == 2
    assert [t["train_s_per_step"] for t in results["thread_trials"]["opd"]] == [1.8, 1.2]
    markdown = (tmp_path / "results.md").read_text()
    assert "| opd | 2 | ok | 1.200 | yes |" in markdown and "| opd | 1 | ok | 1.800 |  |" in markdown


def test_a_benchmark_stopped_midway_leaves_the_results_of_the_runs_it_finished(tmp_path, monkeypatch):
    """results.json is rewritten after every run: interrupted during its second run, the benchmark
    leaves the first run's results and says how much of the plan they are."""

    def fake_run(self, method, seed, desc, run_dir, threads, trial=False):
        if method.name == "opd":
            raise KeyboardInterrupt
        return {"seed": seed, "status": "failed", "returncode": 1, "process_wall_s": 1.0, "log": "npd.log"}

    monkeypatch.setattr(Benchmark, "_run_method", fake_run)
    monkeypatch.setattr(Benchmark, "_prepare_toy", lambda self: None)
    bench = Benchmark(Recipe.toy_cpu(), TOY_MINI, select_methods(["npd", "opd"]), str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        bench.run()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"]["runs completed"] == "1 of 2"
    assert list(results["methods"]) == ["npd"] and results["methods"]["npd"]["runs"][0]["log"] == "npd.log"
    assert "- runs completed: 1 of 2" in (tmp_path / "results.md").read_text()


def test_a_resumed_benchmark_keeps_the_trials_and_finished_runs_and_makes_only_the_rest(tmp_path, monkeypatch):
    """Stopped during its third run, then resumed from a docs-only later commit: the trials and the
    two finished runs are kept as they were, the third run's leftovers are cleared, and the results
    name both parts. Other code, other settings or a dirty tree are refused, naming why."""
    from verl_npd.bench import __main__ as cli
    from verl_npd.bench import runner

    code = {"verl_npd": "a" * 40, "recipes": "b" * 40, "setup.py": "c" * 40}
    state = {"commit": "1" * 40, "local_changes": False, "changed_files": [], "code": code}
    monkeypatch.setattr(runner, "source_state", lambda out: dict(state))
    monkeypatch.setattr(cli, "source_state", lambda out: dict(state))
    monkeypatch.setattr(Benchmark, "_prepare_toy", lambda self: setattr(self, "teacher_accuracy", 0.99))
    calls = []

    def fake_run(self, method, seed, desc, run_dir, threads, trial=False):
        calls.append((method.name, seed, threads, trial))
        if trial:
            return {"status": "ok", "process_wall_s": 9.0, "train_s_per_step": {1: 0.5, 2: 0.4}[threads]}
        if (method.name, seed) == ("npd", 2) and len(calls) == 7:
            os.makedirs(run_dir)  # a stopped run leaves its folder behind
            raise KeyboardInterrupt
        assert not os.path.exists(run_dir)
        return {"seed": seed, "status": "failed", "returncode": 1, "process_wall_s": 1.0, "log": f"{len(calls)}"}

    monkeypatch.setattr(Benchmark, "_run_method", fake_run)
    argv = ["--methods", "npd,opd", "--seeds", "2", "--steps", "2", "--threads", "1,2", "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    assert len(calls) == 7 and calls[4:6] == [("npd", 1, 2, False), ("opd", 1, 2, False)]

    state["commit"] = "2" * 40  # a later commit that changed the docs only
    calls.clear()
    assert cli.main([*argv, "--resume"]) == 1  # every fake run "failed"
    assert calls == [("npd", 2, 2, False), ("opd", 2, 2, False)]
    results = json.loads((tmp_path / "results.json").read_text())
    assert [run["log"] for run in results["methods"]["npd"]["runs"]] == ["5", "1"]
    assert [t["train_s_per_step"] for t in results["thread_trials"]["opd"]] == [0.5, 0.4]
    assert results["settings"]["runs completed"] == "4 of 4" and results["settings"]["commit"] == "2" * 40
    assert results["settings"]["earlier parts"][0]["commit"] == "1" * 40
    assert results["settings"]["earlier parts"][0]["runs completed"] == "2 of 4"

    def refused(**changed):
        previous = json.loads((tmp_path / "results.json").read_text())
        settings = {**previous["settings"], **changed}
        return runner.resume_problem(previous, settings, ["npd", "opd"], 0.99)

    assert refused() is None
    assert "verl_npd differ" in refused(code={**code, "verl_npd": "d" * 40})
    assert "local changes (verl_npd/x.py)" in refused(local_changes=True, changed_files=["verl_npd/x.py"])
    assert "its steps was 2, this run's is 3" in refused(steps=3)
    assert cli.main([*argv, "--seeds", "3", "--resume"]) == 2 and calls[2:] == []
    assert cli.main([*argv, "--resume", "--out", str(tmp_path / "elsewhere")]) == 2


def test_results_record_their_commit_and_the_benchmark_refuses_a_dirty_tree_in_docs(tmp_path, monkeypatch):
    from verl_npd.bench import __main__ as cli
    from verl_npd.bench import runner

    state = runner.source_state(str(tmp_path))
    assert len(state["commit"]) == 40 and state["local_changes"] in (True, False)
    for path, tree in state["code"].items():  # what --resume compares: HEAD's trees of the code
        listed = subprocess.run(
            ["git", "ls-tree", "HEAD", path], cwd=runner.REPO_ROOT, capture_output=True, text=True, check=True
        )
        assert listed.stdout.split()[2] == tree
    assert runner.reference_results_dir(os.path.join(runner.REPO_ROOT, "docs", "benchmarks", "toy_cpu"))
    assert not runner.reference_results_dir(str(tmp_path))

    ran = []
    monkeypatch.setattr(cli.Benchmark, "run", lambda self: ran.append(self.out_dir) or {"methods": {}})
    dirty = {"commit": "c" * 40, "local_changes": True, "changed_files": ["verl_npd/x.py"]}
    monkeypatch.setattr(cli, "source_state", lambda out: dirty)
    docs_out = os.path.join(runner.REPO_ROOT, "docs", "benchmarks", "scratch")
    assert cli.main(["--mini", "--out", docs_out]) == 2 and not ran
    assert cli.main(["--mini", "--out", docs_out, "--allow-dirty"]) == 0 and ran == [docs_out]
    assert cli.main(["--mini", "--out", str(tmp_path)]) == 0  # outside docs/benchmarks: recorded, not refused


def test_the_validation_set_is_held_out_and_extends_the_worlds(toy_world, tmp_path):
    import pandas as pd

    from verl_npd.bench.toy_data import validation_set
    from verl_npd.toy.task import generate_problems, split_of

    def prompts(path):
        return [messages[-1]["content"] for messages in pd.read_parquet(path)["prompt"]]

    val = prompts(validation_set(toy_world, 1024, str(tmp_path)))
    world_val, train = prompts(toy_world.val_parquet), set(prompts(toy_world.train_parquet))
    assert len(val) == len(set(val)) == 1024 and val[:512] == world_val
    # None was trained on, none decided the student's warm-up (the world's 256 dev prompts).
    dev = {p.prompt for p in generate_problems(512 + 256, 0, "val")[512:]}
    assert not set(val) & train and not set(val) & dev and all(split_of(p) == "val" for p in val)
    assert prompts(validation_set(toy_world, 32, str(tmp_path))) == world_val[:32]


def test_the_run_summary_and_the_benchmark_compute_one_wait_share(tmp_path):
    """Wait over training time, the initial validation and every later one left out, in both."""
    from verl_npd.trainer.summary import RunSummary

    clock = iter([20.0, 22.0, 29.0, 31.0, 39.0, 40.0])
    summary = RunSummary(output_dir=str(tmp_path))
    summary.elapsed = lambda: next(clock)
    summary.record_validation(0, {ACC_KEY: 0.3}, initial=True)
    step = {"timing/wait_gen": 0.5, "timing/train": 1.0, "timing/sync": 0.25, "perf/train_tokens": 100.0}
    summary.record_step(1, step, {})
    summary.record_step(2, {**step, ACC_KEY: 0.5, "timing/validation": 5.0}, {})
    summary.record_step(3, step, {})
    summary.record_step(4, {**step, ACC_KEY: 0.7, "timing/validation": 6.0}, {})
    result = summary.finish(steps_run=4, buffer_counters={}, interrupted=False, last_checkpoint_step=4, student_dir="s")
    assert result["training_time_s"] == 8.0  # 39 - 20 - 5 - 6
    assert result["trainer_wait_share"] == 2.0 / 8.0
    run = readers.read_npd(str(tmp_path))
    method = {"label": "NPD", "runs": [{"seed": 1, "status": "ok", **run.as_dict()}]}
    report.summarize_method(method, None)
    assert method["wait_share"]["mean"] == result["trainer_wait_share"]

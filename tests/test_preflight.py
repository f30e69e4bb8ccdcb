"""A misconfigured ``main_npd`` run fails before any Ray actor starts, with one line naming the field."""

import json
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO, TOY_CONFIG, compose, run_main_npd_cases, run_module

from tiny_models import build_tiny_qwen2, build_tiny_tokenizer


# Each bad config and the line main_npd must print for it.
BAD_CONFIGS = [
    (["npd.buffer.max_staleness=-1"], "npd.buffer.max_staleness must be >= 0, got -1"),
    (["npd.filter.lo=0.9", "npd.filter.hi=0.1"], "npd.filter.lo (0.9) must not exceed npd.filter.hi (0.1)"),
    (["npd.sync_interval=0"], "npd.sync_interval must be >= 1, got 0"),
    (["npd.sync_interval=4", "npd.buffer.max_staleness=1"], "npd.sync_interval=4 with npd.buffer.max_staleness=1"),
    # The buffer must hold a step's samples (a check across the npd and data sections).
    (
        ["npd.buffer.capacity=32"],
        "npd.buffer.capacity=32 cannot hold a training batch: data.train_batch_size * actor_rollout_ref.rollout.n = 64",
    ),
    # One home per setting: NPD reads verl's step count and token budget.
    (["+npd.total_steps=150"], "npd.total_steps is verl's trainer.total_training_steps"),
    (
        ["actor_rollout_ref.actor.ppo_max_token_len_per_gpu=64"],
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=64 (NPD's micro-batch token budget) is less than "
        "the longest sample, data.max_prompt_length + data.max_response_length = 88",
    ),
    (["npd.loss.beta=1.5"], "npd.loss.beta must lie in [0, 1], got 1.5"),
    (["+npd.loss.chunk_size=7"], "npd.loss.chunk_size is verl's distillation.distillation_loss.chunked_topk_chunk_size"),
    (
        ["+distillation.distillation_loss.chunked_topk_chunk_size=0"],  # verl's field, not in its yaml
        "distillation.distillation_loss.chunked_topk_chunk_size=0: npd_forward_kl_topk gathers",
    ),
    (["+npd.no_such_field=1"], "npd: unknown field(s) ['no_such_field']"),
    # A mistyped key fails in one line naming the nearest one (Hydra's own error takes six).
    (["npd.buffer.capasity=3"], "verl-npd: npd.buffer.capasity: NPD has no such setting; did you mean npd.buffer.capacity?"),
    # verl would fail after Ray started, with PyTorch's sampler error that names no key.
    (["data.train_batch_size=0"], "verl-npd: data.train_batch_size=0: must be an integer of 1 or more"),
    (["actor_rollout_ref.model.path=/nonexistent/student"], "actor_rollout_ref.model.path: model directory"),
    (["ray_kwargs.ray_init.num_gpus=1"], "needs 2 logical GPUs (trainer 1 + teacher 1)"),
    # A served teacher takes no logical GPU.
    (
        ["npd.teacher.url=http://127.0.0.1:9/v1", "ray_kwargs.ray_init.num_gpus=0"],
        "needs 1 logical GPUs (trainer 1) but ray_kwargs.ray_init.num_gpus is 0",
    ),
    (["npd.teacher.url=127.0.0.1:8000"], "npd.teacher.url must start with http:// or https://, got '127.0.0.1:8000'"),
    (
        ["actor_rollout_ref.rollout.nnodes=1", "actor_rollout_ref.rollout.checkpoint_engine.backend=npd_gloo"],
        "needs 3 logical GPUs (trainer 1 + teacher 1 + standalone rollout 1)",
    ),
    (["actor_rollout_ref.rollout.nnodes=1"], "actor_rollout_ref.rollout.checkpoint_engine.backend=naive cannot"),
    (
        ["trainer.n_gpus_per_node=3", "ray_kwargs.ray_init.num_gpus=4"],
        "64 samples per step cannot be split evenly over the trainer's 3 data-parallel ranks",
    ),
    # The toy prompts are 15 or 17 tokens long.
    (
        ["data.max_prompt_length=16", "data.filter_overlong_prompts=false"],
        "prompts in '{train}' are longer than data.max_prompt_length=16 (first: row ",
    ),
    (["data.max_prompt_length=12"], "are longer than data.max_prompt_length=12: nothing is left"),
    (["data.train_files=/nonexistent.parquet"], "data.train_files: data file '/nonexistent.parquet' does not exist"),
    # Values that verl's config dataclasses reject in __post_init__, inside Ray workers.
    (
        ["distillation.distillation_loss.loss_mode=no_such_loss"],
        "verl-npd: distillation.distillation_loss.loss_mode: Unsupported loss mode: no_such_loss.",
    ),
    (
        ["actor_rollout_ref.actor.loss_agg_mode=no-such-mode"],
        "verl-npd: actor_rollout_ref.actor.loss_agg_mode: Invalid loss_agg_mode: no-such-mode",
    ),
    # A bare assert in verl (no message): the field is read from the asserted line.
    (
        ["actor_rollout_ref.actor.optim.lr_scheduler_type=no-such-schedule"],
        "verl-npd: actor_rollout_ref.actor.optim.lr_scheduler_type: "
        "AssertionError: assert self.lr_scheduler_type in",
    ),
]


@pytest.fixture(scope="module")
def bad_config_runs(toy_world, tmp_path_factory) -> dict[tuple[str, ...], dict]:
    """Every bad config through main_npd's command line, one after the other in one fresh process."""
    cases = [overrides for overrides, _ in BAD_CONFIGS]
    results, process_output = run_main_npd_cases(cases, tmp_path_factory.mktemp("bad_configs"))
    assert "Traceback" not in process_output and "Started a local Ray instance" not in process_output
    return {tuple(overrides): result for overrides, result in zip(cases, results, strict=True)}


@pytest.mark.parametrize("overrides, expected", BAD_CONFIGS)
def test_bad_config_fails_fast_naming_the_field(toy_world, bad_config_runs, overrides, expected):
    result = bad_config_runs[tuple(overrides)]
    assert result["returncode"] == 2, result["stdout"][-2000:] + result["stderr"][-2000:]
    assert expected.format(train=toy_world.train_parquet) in result["stderr"]
    assert "Traceback" not in result["stderr"]
    # No Ray cluster was started: its banner never appears, and no actor printed anything.
    assert not result["ray_started"]
    assert "Started a local Ray instance" not in result["stdout"] + result["stderr"]
    assert result["seconds"] < 120


def test_one_tokenizer_check_rejects_the_pair_in_preflight_and_in_the_score_cli(toy_world, tmp_path, capsys):
    """A student whose vocabulary is not the teacher's: main_npd's preflight and the scoring CLI both
    refuse it, each naming both vocabulary sizes, by the same rule."""
    from transformers import AutoTokenizer

    from verl_npd.score import main as score_main

    other_student = tmp_path / "student"
    tokenizer = build_tiny_tokenizer(other_student)
    build_tiny_qwen2(other_student, vocab_size=len(tokenizer))
    teacher_size = len(AutoTokenizer.from_pretrained(toy_world.teacher_dir).get_vocab())
    student_size = len(tokenizer.get_vocab())
    assert teacher_size != student_size

    result = run_module("verl_npd.main_npd", [f"actor_rollout_ref.model.path={other_student}"], timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("verl-npd: distillation.teacher_models.teacher_model.model_path: "), line
    assert f"teacher and student tokenizers differ: vocab sizes teacher {teacher_size} vs student {student_size}" in line

    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "response": "Answer: 2"}) + "\n")
    args = ["--teacher", toy_world.teacher_dir, "--student", str(other_student), "--data", str(data)]
    assert score_main([*args, "--out", str(tmp_path / "scored.jsonl")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--teacher and --student tokenizers differ: vocab sizes --teacher {teacher_size} vs --student {student_size}" in line


def test_overlong_prompts_are_counted_when_they_are_skipped(toy_world):
    # Filtering keeps the run going (it then stops at the resource check, before Ray).
    result = run_module(
        "verl_npd.main_npd", ["data.max_prompt_length=16", "ray_kwargs.ray_init.num_gpus=1"], timeout=120
    )
    assert result.returncode == 2, result.stderr[-2000:]
    val_rows = pq.read_table(toy_world.val_parquet).num_rows
    counted = re.search(r"data.val_files: (\d+) of (\d+) prompts .* are skipped \(data.filter_overlong_prompts=true\)",
                        result.stderr)
    assert counted, result.stderr[-2000:]
    assert 0 < int(counted.group(1)) < int(counted.group(2)) == val_rows


@pytest.mark.parametrize("problem", ["no rows", "no prompt column"])
def test_bad_dataset_is_named(toy_world, tmp_path, problem):
    table = pq.read_table(toy_world.train_parquet)
    table = table.slice(0, 0) if problem == "no rows" else table.drop(["prompt"])
    bad = tmp_path / "train.parquet"
    pq.write_table(table, bad)
    result = run_module("verl_npd.main_npd", [f"data.train_files={bad}"], timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"verl-npd: data.train_files: '{bad}' has {problem}"), line


@pytest.mark.parametrize(
    "config_dir, config_name",
    [TOY_CONFIG]
    + [(f"recipes/{recipe}/config", "npd") for recipe in sorted(os.listdir(os.path.join(REPO, "recipes")))
       if os.path.isfile(os.path.join(REPO, "recipes", recipe, "config", "npd.yaml"))],
)
def test_shipped_configs_pass_verl_config_check(toy_world, config_dir, config_name):
    """verl's dataclasses accept every config we ship (with our loss modes, engines and patches in
    place). The GPU recipes' hub models are not here: the student is the toy's, as verl loads its
    tokenizer and config while building the model section."""
    from verl_npd.trainer.preflight import check_verl_config

    overrides = [] if config_name == TOY_CONFIG[1] else [f"actor_rollout_ref.model.path={toy_world.student_dir}"]
    check_verl_config(compose(config_dir, config_name, overrides))


def test_the_base_config_alone_names_what_it_leaves_unset():
    """npd_trainer.yaml names no model, data or rollout engine: run as it is, preflight lists them."""
    from verl_npd.trainer.preflight import PreflightError, preflight

    config = compose("verl_npd/config", "npd_trainer", ["hydra.searchpath=[pkg://verl.trainer.config]"])
    expected = (
        "the config does not set actor_rollout_ref.model.path, actor_rollout_ref.rollout.name, data.train_files, "
        "data.val_files, distillation.teacher_models.teacher_model.model_path: npd_trainer.yaml is a base"
    )
    with pytest.raises(PreflightError, match=re.escape(expected)):
        preflight(config)
    # Set on the command line instead, they pass this check (and, with a batch that NPD's default
    # buffer holds, unlike verl's default of 1024 prompts, fail on the model check: no such file).
    named = compose(
        "verl_npd/config",
        "npd_trainer",
        [
            "hydra.searchpath=[pkg://verl.trainer.config]",
            "data.train_batch_size=64",
            "actor_rollout_ref.model.path=/nowhere/student",
            "actor_rollout_ref.rollout.name=npd_cpu",
            "data.train_files=/nowhere/train.parquet",
            "data.val_files=/nowhere/val.parquet",
            "distillation.teacher_models.teacher_model.model_path=/nowhere/teacher",
        ],
    )
    with pytest.raises(PreflightError, match=re.escape("actor_rollout_ref.model.path: model directory '/nowhere/student' does not exist")):
        preflight(named)


def test_model_directory_without_tokenizer_and_weights_is_named(toy_world, tmp_path):
    """A student directory with only a config.json: the missing parts are named, before the vocabulary
    comparison (which would report a 1-token student vocabulary)."""
    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text((Path(toy_world.student_dir) / "config.json").read_text())
    result = run_module("verl_npd.main_npd", [f"actor_rollout_ref.model.path={student}"], timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    expected = f"verl-npd: actor_rollout_ref.model.path: model directory '{student}' has no tokenizer"
    assert line.startswith(expected), line
    assert "and no weights" in line
    assert "no config" not in line


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A complete tiny model directory (tokenizer, config, one safetensors file); it passes the check."""
    from verl_npd.trainer.preflight import check_model_path

    tokenizer = build_tiny_tokenizer(tmp_path)
    build_tiny_qwen2(tmp_path, vocab_size=len(tokenizer))
    assert check_model_path("m", str(tmp_path)) == str(tmp_path)
    return tmp_path


def test_truncated_safetensors_is_named(tiny_model_dir):
    from verl_npd.trainer.preflight import PreflightError, check_model_path

    weights = tiny_model_dir / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    with pytest.raises(PreflightError, match=r"^m: model directory '.*': model.safetensors is not a readable "
                                             r"safetensors file \(truncated or corrupt\?\)"):
        check_model_path("m", str(tiny_model_dir))


def test_sharded_model_with_a_missing_shard_is_named(tiny_model_dir):
    from verl_npd.trainer.preflight import PreflightError, check_model_path

    (tiny_model_dir / "model.safetensors").unlink()
    model = build_tiny_qwen2(None, vocab_size=len(build_tiny_tokenizer(tiny_model_dir)))
    model.save_pretrained(str(tiny_model_dir), max_shard_size="100KB")
    with open(tiny_model_dir / "model.safetensors.index.json") as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    assert len(shards) > 2
    assert check_model_path("m", str(tiny_model_dir)) == str(tiny_model_dir)  # every shard present: fine
    (tiny_model_dir / shards[1]).unlink()
    with pytest.raises(PreflightError) as raised:
        check_model_path("m", str(tiny_model_dir))
    assert str(raised.value).endswith(
        f"model.safetensors.index.json lists {len(shards)} shards, 1 missing: {shards[1]}"
    )


@pytest.mark.parametrize(
    "rollout, accepted",
    [
        ({"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs_mode": "processed_logprobs"}, True),
        # Reshaped sampling: the sampler's processed log-probs are not the raw model's.
        ({"temperature": 0.7, "top_p": 1.0, "top_k": -1, "logprobs_mode": "processed_logprobs"}, False),
        ({"temperature": 1.0, "top_p": 0.9, "top_k": -1, "logprobs_mode": "processed_logprobs"}, False),
        ({"temperature": 1.0, "top_p": 1.0, "top_k": 20, "logprobs_mode": "processed_logprobs"}, False),
        # Raw log-probs describe the model whatever the sampling.
        ({"temperature": 0.7, "top_p": 0.9, "top_k": 20, "logprobs_mode": "raw_logprobs"}, True),
    ],
)
def test_the_students_ifd_terms_must_describe_one_distribution(rollout, accepted):
    from omegaconf import OmegaConf

    from verl_npd.trainer.preflight import PreflightError, check_behaviour_log_probs

    config = OmegaConf.create(rollout)
    if accepted:
        check_behaviour_log_probs(config)
    else:
        with pytest.raises(PreflightError, match="actor_rollout_ref.rollout.temperature=.*logprobs_mode=raw_logprobs"):
            check_behaviour_log_probs(config)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"sync_interval": 0}, "npd.sync_interval must be >= 1, got 0"),
        ({"buffer": {"max_staleness": -1}}, "npd.buffer.max_staleness must be >= 0, got -1"),
        ({"sync_interval": 3, "buffer": {"max_staleness": 1}}, "npd.sync_interval=3 with npd.buffer.max_staleness=1 can starve"),
        ({"buffer": {"stale_policy": "skip"}}, "npd.buffer.stale_policy must be one of ('wait', 'drop'), got 'skip'"),
        # Types first: a range check on a string would fail naming no key.
        ({"buffer": {"capacity": "abc"}}, "npd.buffer.capacity='abc': must be an integer"),
        ({"sync_interval": True}, "npd.sync_interval=True: must be an integer"),
        ({"verbose": "yes"}, "npd.verbose='yes': must be true or false"),
        ({"teacher": {"url": ["http://a:1/v1", 3]}}, "npd.teacher.url=['http://a:1/v1', 3]: must be a string or a list of strings or null"),
        ({"loss": {"tail_mode": "tail"}}, "npd.loss.tail_mode='tail': must be one of ['renorm', 'bucket']"),
        ({"buffer": 3}, "npd.buffer=3: must be a section of settings (a mapping)"),
    ],
)
def test_npd_settings_are_checked_where_they_are_parsed(values, message):
    """NPDConfig checks its own settings once, naming each key; the bound sync_interval <=
    max_staleness + 1 holds at the limit."""
    from verl_npd.trainer.config import NPDConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        NPDConfig.from_mapping(values)
    assert NPDConfig.from_mapping({"sync_interval": 3, "buffer": {"max_staleness": 2}}).sync_interval == 3


def test_numbers_may_be_written_as_integers_and_optional_settings_as_null():
    from verl_npd.trainer.config import NPDConfig

    npd = NPDConfig.from_mapping({"shutdown_timeout_s": 5, "teacher_accuracy": None, "teacher": {"url": ["http://a:1/v1"]}})
    assert npd.shutdown_timeout_s == 5 and npd.teacher.urls == ["http://a:1/v1"]


def leaf_keys(values: dict, prefix: str) -> list[str]:
    keys = []
    for name, value in values.items():
        keys += leaf_keys(value, f"{prefix}.{name}") if isinstance(value, dict) else [f"{prefix}.{name}"]
    return keys


def test_command_line_keys_under_npd_are_checked_against_every_setting():
    """Every key of the npd section as Hydra stores it is accepted; a mistyped or moved one is named
    with the key to use."""
    from dataclasses import asdict

    from verl_npd.trainer.config import NPDConfig, unknown_setting

    keys = leaf_keys(asdict(NPDConfig()), "npd")
    assert len(keys) > 30 and "npd.teacher.url" in keys
    assert [key for key in keys if unknown_setting(key)] == []
    assert unknown_setting("npd.teacher.url.0") is None  # an item of the URL list
    assert unknown_setting("npd.sync_intervl").startswith("npd.sync_intervl: NPD has no such setting; did you mean npd.sync_interval?")
    assert unknown_setting("npd.filter.zzz").startswith("npd.filter.zzz: NPD has no such setting; npd.filter has ['band',")
    assert unknown_setting("npd.packing.token_budget") == (
        "npd.packing.token_budget is verl's actor_rollout_ref.actor.ppo_max_token_len_per_gpu (NPD reads verl's key); "
        "set that instead"
    )


@pytest.mark.parametrize(
    "key, null_means",
    [
        ("data.train_batch_size", None),
        ("data.val_batch_size", "the whole validation set as one batch"),
        ("data.max_prompt_length", None),
        ("data.max_response_length", None),
        ("actor_rollout_ref.rollout.n", None),
        ("actor_rollout_ref.actor.ppo_mini_batch_size", None),
        ("actor_rollout_ref.actor.ppo_max_token_len_per_gpu", None),
        ("trainer.total_training_steps", "data.train_files' batches times trainer.total_epochs"),
    ],
)
def test_sizes_verl_uses_unchecked_are_checked_before_ray(toy_world, key, null_means):
    """A size of 0, a negative one or a string is the one problem named (the toy's
    ppo_mini_batch_size repeats data.train_batch_size and is not named again); null only where verl
    gives it a meaning."""
    from verl_npd.trainer.preflight import preflight

    allowed = "an integer of 1 or more" + (f", or null for {null_means}" if null_means else "")
    for value, written in (("0", "0"), ("-3", "-3"), ("abc", "'abc'")):
        problems = preflight(compose(*TOY_CONFIG, [f"{key}={value}"]), collect=True).problems
        assert problems == [f"{key}={written}: must be {allowed}"]
    problems = preflight(compose(*TOY_CONFIG, [f"{key}=null"]), collect=True).problems
    assert problems == ([] if null_means else [f"{key}=None: must be {allowed}"])


def test_loss_settings_and_the_warnings_filter_reach_the_ray_job():
    """``npd.loss`` crosses into verl's training workers as ``VERL_NPD_LOSS`` in the job's runtime
    environment (what verl's ray.init passes to every worker), as do the engine warnings' filter."""
    from verl_npd.losses.verl_registration import ENV_VAR
    from verl_npd.main_npd import set_job_environment
    from verl_npd.trainer.preflight import npd_settings

    config = compose(*TOY_CONFIG, ["npd.loss.tail_mode=bucket", "npd.loss.beta=0.9"])
    set_job_environment(config, npd_settings(config).loss)
    env_vars = config.ray_kwargs.ray_init.runtime_env.env_vars
    assert json.loads(env_vars[ENV_VAR]) == {"tail_mode": "bucket", "beta": 0.9}
    assert "ignore::UserWarning:verl.workers.engine" in env_vars.PYTHONWARNINGS.split(",")


def test_every_problem_is_collected_for_the_readiness_check(toy_world):
    """preflight(collect=True), what ``main_npd --check`` runs: every independent problem of the config,
    each named once with its key and fix, where a run stops at the first."""
    from verl_npd.trainer.preflight import PreflightError, preflight

    faults = [
        "npd.sync_interval=0",
        "actor_rollout_ref.rollout.free_cache_engine=true",
        "actor_rollout_ref.rollout.max_model_len=64",
        "ray_kwargs.ray_init.num_gpus=1",
        "data.val_files=/nonexistent.parquet",
    ]
    config = compose(*TOY_CONFIG, faults)
    problems = preflight(config, collect=True).problems
    expected = [
        "invalid config: npd.sync_interval must be >= 1, got 0",
        "data.val_files: data file '/nonexistent.parquet' does not exist",
        "actor_rollout_ref.rollout.free_cache_engine=true with the rollout colocated with the trainer",
        "actor_rollout_ref.rollout.max_model_len=64 is less than data.max_prompt_length + data.max_response_length = 88; set it to 88",
        "this CPU run needs 2 logical GPUs (trainer 1 + teacher 1) but ray_kwargs.ray_init.num_gpus is 1",
    ]
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected):
        assert problem.startswith(start), (problem, start)
    with pytest.raises(PreflightError, match="npd.sync_interval must be >= 1"):
        preflight(compose(*TOY_CONFIG, faults))


@pytest.mark.parametrize(
    "overrides, problem",
    [
        # The student's vLLM colocated with the trainer: synced in-process, never asleep, no prefix cache.
        (["actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.enable_prefix_caching=true"],
         "actor_rollout_ref.rollout.enable_prefix_caching=true with the student's vLLM colocated"),
        (["actor_rollout_ref.rollout.checkpoint_engine.backend=npd_gloo"],
         "actor_rollout_ref.rollout.checkpoint_engine.backend=npd_gloo with the rollout colocated"),
    ],
)
def test_a_colocated_rollout_is_synced_in_process_and_caches_no_prefix(overrides, problem):
    from omegaconf import OmegaConf

    from verl_npd.trainer.preflight import PreflightError, check_colocated_rollout

    rollout = OmegaConf.create({"nnodes": 0, "name": "npd_cpu", "free_cache_engine": False,
                                "enable_prefix_caching": False, "checkpoint_engine": {"backend": "naive"}})
    check_colocated_rollout(rollout)
    for override in overrides:
        key, value = override.removeprefix("actor_rollout_ref.rollout.").split("=")
        OmegaConf.update(rollout, key, {"true": True}.get(value, value))
    with pytest.raises(PreflightError, match=re.escape(problem)):
        check_colocated_rollout(rollout)
    rollout.nnodes = 1  # a standalone rollout is synced after an abort that clears the cache
    check_colocated_rollout(rollout)


@pytest.fixture
def gpu_machine(monkeypatch, tmp_path):
    """What a CPU machine cannot have, faked: 8 CUDA GPUs, flash-attn and cupy installed, verl's vLLM,
    and a wandb login in a home of its own. Returns a function that takes any of them away."""
    from verl_npd.platform import gpu_stack
    from verl_npd.trainer import preflight

    installed = {"flash_attn": True, "cupy": True}
    versions = {"vllm": "0.24.0"}
    gpus = {"count": 8}
    monkeypatch.setattr(gpu_stack, "module_installed", lambda name: installed.get(name, False))
    monkeypatch.setattr(gpu_stack, "installed_version", lambda name: versions.get(name))
    monkeypatch.setattr(preflight, "cuda_gpus_here", lambda: gpus["count"])
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    netrc.chmod(0o600)

    def take_away(what: str, value=None):
        if what in installed:
            installed[what] = False
        elif what == "vllm":
            versions["vllm"] = value
        elif what == "gpus":
            gpus["count"] = value
        elif what == "wandb":
            netrc.unlink()

    return take_away


def recipe_with_toy_models(toy_world, *overrides):
    """The Qwen3 recipe's NPD config (8 GPUs: 2 trainer, 4 rollout, 2 teacher), with the toy's models and
    data in place of the hub's, which are not here."""
    return compose("recipes/qwen3_1.7b_from_8b_gsm8k_math/config", "npd", [
        f"actor_rollout_ref.model.path={toy_world.student_dir}",
        f"distillation.teacher_models.teacher_model.model_path={toy_world.teacher_dir}",
        f"data.train_files={toy_world.train_parquet}",
        f"data.val_files={toy_world.val_parquet}",
        *overrides,
    ])


def test_the_readiness_check_passes_a_ready_gpu_recipe_and_prints_its_plan(toy_world, gpu_machine):
    import io

    from verl_npd.trainer.readiness import check_readiness

    out = io.StringIO()
    assert check_readiness(recipe_with_toy_models(toy_world), gpu_memory_gib=80, out=out) == 0, out.getvalue()
    report = out.getvalue()
    for line in [
        "trainer: 2 GPU(s) (trainer.n_gpus_per_node=2 x trainer.nnodes=1): 2 FSDP2 rank(s), 96 samples each per step",
        "standalone rollout: 4 GPU(s) (actor_rollout_ref.rollout.n_gpus_per_node=4 x nnodes=1): 4 student replica(s) "
        "(vllm, TP 1), memory share 0.85 (actor_rollout_ref.rollout.standalone_gpu_memory_utilization), synced through nccl",
        "validation: 2 student replica(s) on the trainer's GPUs (verl 0.9.1 builds them), memory share 0.5",
        "default: 2 replica(s) (vllm, TP 1), memory share 0.7",
        "total: 8 GPU(s)",
        "memory, per GPU of 80.0 GiB (--gpu-memory-gib):",
        "verl-npd: ready",
    ]:
        assert line in report, (line, report)
    assert "problem:" not in report


def test_the_readiness_check_lists_every_problem_a_gpu_machine_can_have(toy_world, gpu_machine):
    """Each problem the check knows, at once: flash-attn asked for and missing, cupy missing for the
    nccl sync, a vLLM other than verl's pin, fewer GPUs than the plan, wandb without a login, and
    models that do not fit their share of a (here tiny) GPU."""
    import io

    from verl_npd.trainer.readiness import check_readiness

    for what, value in [("flash_attn", None), ("cupy", None), ("vllm", "0.23.0"), ("gpus", 4), ("wandb", None)]:
        gpu_machine(what, value)
    config = recipe_with_toy_models(
        toy_world,
        "+actor_rollout_ref.model.override_config.attn_implementation=flash_attention_2",
        "trainer.logger=[console,wandb]",
    )
    out = io.StringIO()
    # 1 MiB per GPU: the toy teacher's 1.1 MiB of bf16 weights do not fit 0.7 of it.
    assert check_readiness(config, gpu_memory_gib=2**-10, out=out) == 2
    problems = [line.removeprefix("problem: ") for line in out.getvalue().splitlines() if line.startswith("problem: ")]
    expected = [
        "this run needs 8 GPUs (trainer 2 + teacher 2 + standalone rollout 4) but this node has 4",
        "actor_rollout_ref.model.override_config.attn_implementation=flash_attention_2 but flash-attn is not installed",
        "actor_rollout_ref.rollout.checkpoint_engine.backend=nccl needs cupy, which is not installed",
        "vLLM 0.23.0 is installed, but verl 0.9.1 pins vllm==0.24.0",
        "trainer.logger includes wandb, but wandb has no login here",
        # The toy student (0.20 M parameters, 0.4 MiB in bf16) fits its replicas' shares; its trainer
        # rank does not: 0.20 M x 16 B / 2 ranks + 8192 tokens x 26 entries x 12 B of logits.
        "a trainer rank: needs 4.0 MiB (FSDP2 states 0.20 M params x 16 B / 2 ranks = 1.5 MiB, logits 8192 tokens",
        "a replica of the teacher 'teacher_model': needs 1.1 MiB (weights: 0.60 M params x 2 B / TP 1), has 0.7 MiB",
    ]
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected):
        assert problem.startswith(start), (problem, start)
    assert "verl-npd: not ready: 7 problem(s) above" in out.getvalue()


def test_wandb_needs_a_login_only_when_it_logs(monkeypatch, tmp_path):
    from omegaconf import OmegaConf

    from verl_npd.trainer.preflight import PreflightError, check_wandb_login

    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    wandb = OmegaConf.create({"trainer": {"logger": ["console", "wandb"]}})
    check_wandb_login(OmegaConf.create({"trainer": {"logger": ["console", "tensorboard"]}}))
    with pytest.raises(PreflightError, match=r"no api\.wandb\.ai entry in .*\.netrc.*run `wandb login`"):
        check_wandb_login(wandb)
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_wandb_login(wandb)
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    check_wandb_login(wandb)


def test_check_on_the_command_line_exits_2_listing_every_problem(toy_world):
    result = run_module("verl_npd.main_npd", ["npd.sync_interval=0", "ray_kwargs.ray_init.num_gpus=1", "--check"],
                        timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 2 and "npd.sync_interval must be >= 1" in problems[0] and "logical GPUs" in problems[1]
    assert "  total: 2 GPU(s)" in result.stdout
    assert "Started a local Ray instance" not in result.stdout + result.stderr
    misused = run_module("verl_npd.main_npd", ["--gpu-memory-gib", "80"], timeout=60)
    assert misused.returncode == 2 and "verl-npd: --gpu-memory-gib is for --check" in misused.stderr

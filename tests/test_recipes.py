"""Every recipe's configs compose, fit the GPUs their README declares (preflight's resource
arithmetic, nothing started), pass verl's own config validation, and each NPD config differs from
its OPD baseline only in the keys the recipe's README lists; the GPU recipes' layouts, engine
memory settings and memory shares hold together (the models' sizes from their architectures)."""

import os
import re

import pytest
from omegaconf import OmegaConf

from conftest import REPO, TOY_CONFIG, compose

RECIPES = os.path.join(REPO, "recipes")
# recipe -> (folder and name of its NPD config, folder of its OPD baseline config)
PAIRS = {
    "qwen3_1.7b_from_8b_gsm8k_math": (("recipes/qwen3_1.7b_from_8b_gsm8k_math/config", "npd"), "recipes/qwen3_1.7b_from_8b_gsm8k_math/config"),
    "qwen2.5_0.5b_from_7b_gsm8k": (("recipes/qwen2.5_0.5b_from_7b_gsm8k/config", "npd"), "recipes/qwen2.5_0.5b_from_7b_gsm8k/config"),
    # The toy NPD config is main_npd's default; its OPD configs ship with the package.
    "toy_cpu": (TOY_CONFIG, "verl_npd/config/toy_opd"),
}
# recipe -> folder of its NPD config, for recipes with no OPD baseline: on one GPU verl's OPD has no
# GPU for its teacher's pool.
UNPAIRED = {"qwen2.5_0.5b_from_7b_gsm8k_1gpu": "recipes/qwen2.5_0.5b_from_7b_gsm8k_1gpu/config"}
GPU_NPD_CONFIGS = {
    recipe: (folder, "npd") for recipe, ((folder, _), _) in PAIRS.items() if recipe != "toy_cpu"
} | {recipe: (folder, "npd") for recipe, folder in UNPAIRED.items()}


def leaves(node, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value of every leaf of a plain (to_container) config."""
    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in leaves(child, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def documented_differences(recipe: str) -> set[str]:
    """The keys in the first column of the README's "Keys that differ" table."""
    text = open(os.path.join(RECIPES, recipe, "README.md")).read()
    section = text.split("### Keys that differ between the two configs", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\| `([a-z0-9_.]+)` \|", section, flags=re.MULTILINE))


# verl's asynchronous OPD modes count a run in their own terms (a step is a weight sync of several
# updates; fully_async: a budget of prompts): test_bench.py checks how the benchmark sizes them.
OWN_STEP_UNITS = ("opd_separate_async", "opd_fully_async")


def configs_of(recipe: str) -> list[tuple[str, str]]:
    """(folder, name) of the recipe's NPD config and of every verl OPD config beside it that counts
    optimizer steps in trainer.total_training_steps."""
    if recipe in UNPAIRED:
        return [(UNPAIRED[recipe], "npd")]
    (npd_folder, npd_name), opd_folder = PAIRS[recipe]
    names = sorted(f[:-5] for f in os.listdir(os.path.join(REPO, opd_folder)) if f.startswith("opd_") and f.endswith(".yaml"))
    return [(npd_folder, npd_name), *((opd_folder, name) for name in names if name not in OWN_STEP_UNITS)]


@pytest.mark.parametrize("recipe", sorted(PAIRS | UNPAIRED))
def test_the_step_count_and_the_token_budget_have_one_home(toy_world, recipe):
    """NPD reads verl's own step count (which verl's learning-rate schedule reads too) and token
    budget: an override of either reaches every config of the recipe, NPD's and each OPD mode's, and
    the npd section holds no copy that could disagree."""
    overrides = ["trainer.total_training_steps=123", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=4567"]
    for folder, name in configs_of(recipe):
        config = OmegaConf.to_container(compose(folder, name, overrides), resolve=True)
        values = leaves(config)
        assert values["trainer.total_training_steps"] == 123, name
        assert values["actor_rollout_ref.actor.ppo_max_token_len_per_gpu"] == 4567, name
        # verl's own keys that follow them (log_prob_max_token_len_per_gpu) follow the override too.
        assert values["actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu"] == 4567, name
        assert not {key for key in values if key.startswith("npd.") and ("total_steps" in key or "budget" in key)}


def declared_gpus(recipe: str, method: str) -> dict[str, int]:
    """The GPUs of each pool of ``method`` (NPD or OPD) from the recipe's row of recipes/README.md's
    table, e.g. "NPD 2 trainer + 4 rollout + 2 teacher; OPD 6 trainer + 2 teacher"."""
    table = open(os.path.join(RECIPES, "README.md")).read()
    row = next(line for line in table.splitlines() if line.startswith(f"| [`{recipe}/`]"))
    layout = re.search(rf"{method} ((?:\d+ \w+(?: \+ )?)+)", row).group(1)
    pools = {pool: int(count) for count, pool in re.findall(r"(\d+) (\w+)", layout)}
    return {"trainer": pools["trainer"], "teacher": pools.get("teacher", 0), "standalone rollout": pools.get("rollout", 0)}


def test_every_recipe_is_checked():
    folders = sorted(d for d in os.listdir(RECIPES) if os.path.isdir(os.path.join(RECIPES, d)))
    assert folders == sorted(PAIRS | UNPAIRED)


def started_config(recipe: str, script: str) -> tuple[str, str]:
    """(folder relative to the repo, name) of the config ``recipes/<recipe>/<script>`` starts; a
    ``main_npd`` without --config-path starts its default, the toy demo."""
    text = open(os.path.join(RECIPES, recipe, script)).read()
    found = re.search(r"--config-path (\S+) --config-name (\S+)", text)
    if found is None:
        assert "python -m verl_npd.main_npd" in text, script
        return TOY_CONFIG
    path = found.group(1).strip('"')
    if path.startswith("pkg://"):
        path = path.removeprefix("pkg://").replace(".", "/")
    return path.removeprefix("$PWD/"), found.group(2)


@pytest.mark.parametrize("recipe", sorted(PAIRS | UNPAIRED))
def test_the_run_scripts_start_the_configs_checked_here(recipe):
    assert started_config(recipe, "run_npd.sh") == configs_of(recipe)[0]
    if recipe in PAIRS:
        assert started_config(recipe, "run_opd_baseline.sh") == (PAIRS[recipe][1], "opd_baseline")


@pytest.mark.parametrize("recipe", sorted(PAIRS))
def test_npd_and_opd_differ_only_where_the_readme_says(toy_world, recipe):
    (npd_folder, npd_name), opd_folder = PAIRS[recipe]
    npd = OmegaConf.to_container(compose(npd_folder, npd_name), resolve=True)
    opd = OmegaConf.to_container(compose(opd_folder, "opd_baseline"), resolve=True)
    assert "npd" not in opd
    npd.pop("npd")
    npd_leaves, opd_leaves = leaves(npd), leaves(opd)
    missing = object()
    differing = {k for k in npd_leaves.keys() | opd_leaves.keys() if npd_leaves.get(k, missing) != opd_leaves.get(k, missing)}
    assert differing == documented_differences(recipe)


@pytest.mark.parametrize("recipe", sorted(PAIRS | UNPAIRED))
def test_configs_fit_the_declared_gpus_and_pass_verls_checks(toy_world, recipe):
    """Each GPU recipe's NPD runs on the GPUs its README row declares (a standalone rollout pool of
    its own, or the one-GPU layout), and its OPD baseline on the same number of GPUs in verl's
    standard layout; the NPD layout passes the preflight's layout checks."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from verl_npd.trainer.preflight import check_colocated_rollout, check_standalone_rollout, plan_resources

    configs = {"NPD": compose(*configs_of(recipe)[0])}
    if recipe in PAIRS:
        configs["OPD"] = compose(PAIRS[recipe][1], "opd_baseline")
    for method, config in configs.items():
        validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
        pools = plan_resources(config)
        if recipe == "toy_cpu":
            assert pools["standalone rollout"] == 0 and sum(pools.values()) <= config.ray_kwargs.ray_init.num_gpus
        else:
            assert pools == declared_gpus(recipe, method), method
    check_standalone_rollout(configs["NPD"].actor_rollout_ref.rollout)
    check_colocated_rollout(configs["NPD"].actor_rollout_ref.rollout)
    if "OPD" in configs and recipe != "toy_cpu":
        assert sum(plan_resources(configs["NPD"]).values()) == sum(plan_resources(configs["OPD"]).values())


def test_standalone_replicas_take_their_own_memory_share():
    """The standalone replicas own their GPUs and are built with rollout.standalone_gpu_memory_utilization;
    rollout.gpu_memory_utilization stays the share of the validation replicas on the trainer's GPUs."""
    from verl_npd.trainer.near_policy_trainer import standalone_rollout_config

    config = compose(*GPU_NPD_CONFIGS["qwen3_1.7b_from_8b_gsm8k_math"])
    standalone = standalone_rollout_config(config)
    assert standalone.actor_rollout_ref.rollout.gpu_memory_utilization == 0.85
    assert config.actor_rollout_ref.rollout.gpu_memory_utilization == 0.5
    assert OmegaConf.to_container(standalone.data) == OmegaConf.to_container(config.data)
    unset = compose(*GPU_NPD_CONFIGS["qwen3_1.7b_from_8b_gsm8k_math"], ["~actor_rollout_ref.rollout.standalone_gpu_memory_utilization"])
    assert standalone_rollout_config(unset) is unset


# NPD with its student's vLLM colocated with the trainer (verl's hybrid engine), as the recipes'
# READMEs give it: trainer GPUs, then these.
COLOCATED = (
    "actor_rollout_ref.rollout.nnodes=0",
    "actor_rollout_ref.rollout.checkpoint_engine.backend=naive",
    "actor_rollout_ref.rollout.free_cache_engine=false",
    "actor_rollout_ref.rollout.gpu_memory_utilization=0.35",
)


@pytest.mark.parametrize(
    "recipe, npd_overrides, opd_overrides, npd_pools, opd_pools",
    [
        # recipes/qwen2.5_0.5b_from_7b_gsm8k/README.md, "The 2-GPU variant": NPD colocated.
        (
            "qwen2.5_0.5b_from_7b_gsm8k",
            ("trainer.n_gpus_per_node=1", "distillation.n_gpus_per_node=1", *COLOCATED),
            ("trainer.n_gpus_per_node=1", "distillation.n_gpus_per_node=1"),
            (1, 0, 1),
            (1, 0, 1),
        ),
        # recipes/qwen3_1.7b_from_8b_gsm8k_math/README.md: NPD colocated on the baseline's 6 + 2.
        ("qwen3_1.7b_from_8b_gsm8k_math", ("trainer.n_gpus_per_node=6", *COLOCATED), (), (6, 0, 2), (6, 0, 2)),
        # README.md, "N GPUs, M nodes": the Qwen3 recipe on 2 nodes of 8 GPUs.
        (
            "qwen3_1.7b_from_8b_gsm8k_math",
            ("trainer.nnodes=2", "actor_rollout_ref.rollout.nnodes=2", "distillation.nnodes=2"),
            ("trainer.nnodes=2", "distillation.nnodes=2"),
            (4, 8, 4),
            (12, 0, 4),
        ),
    ],
)
def test_documented_variants_fit(recipe, npd_overrides, opd_overrides, npd_pools, opd_pools):
    from verl_npd.trainer.preflight import check_colocated_rollout, check_standalone_rollout, plan_resources

    for name, overrides, pools in (("npd", npd_overrides, npd_pools), ("opd_baseline", opd_overrides, opd_pools)):
        config = compose(f"recipes/{recipe}/config", name, overrides)
        expected = dict(zip(("trainer", "standalone rollout", "teacher"), pools))
        assert plan_resources(config) == {key: expected[key] for key in ("trainer", "teacher", "standalone rollout")}
        if name == "npd":
            check_standalone_rollout(config.actor_rollout_ref.rollout)
            check_colocated_rollout(config.actor_rollout_ref.rollout)


@pytest.mark.parametrize(
    "overrides, problem",
    [
        (("trainer.n_gpus_per_node=5",), "192 samples per step cannot be split evenly over the trainer's 5 data-parallel"),
        (("actor_rollout_ref.rollout.tensor_model_parallel_size=3",), "the rollout's 4 GPUs (actor_rollout_ref.rollout.n_gpus_per_node"),
        (("distillation.teacher_models.teacher_model.inference.tensor_model_parallel_size=3",), "distillation: Single teacher's per_replica_world_size (3) must divide"),
        (("actor_rollout_ref.actor.ulysses_sequence_parallel_size=4",), "cannot form groups of"),
    ],
)
def test_resource_arithmetic_names_the_split_that_fails(overrides, problem):
    from verl_npd.trainer.preflight import PreflightError, plan_resources

    config = compose("recipes/qwen3_1.7b_from_8b_gsm8k_math/config", "npd", overrides)
    with pytest.raises(PreflightError, match=re.escape(problem)):
        plan_resources(config)


# The recipes' models, as their Hugging Face config.json describes them (what the memory estimate
# reads; the hub is not reachable here).
ARCHITECTURES = {
    "Qwen/Qwen3-1.7B": dict(model_type="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                            num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                            tie_word_embeddings=True),
    "Qwen/Qwen3-8B": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                          num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                          tie_word_embeddings=False),
    "Qwen/Qwen2.5-0.5B-Instruct": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                       tie_word_embeddings=True),
    "Qwen/Qwen2.5-7B-Instruct": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                     tie_word_embeddings=False),
}


def hand_counted_parameters(arch: dict) -> int:
    """Qwen2/Qwen3 parameters from the architecture by hand: embeddings (and an untied head); per layer
    q, k, v, o projections (Qwen2 with q/k/v biases, Qwen3 with q/k norms), the gated MLP, two norms;
    the final norm."""
    hidden, vocab = arch["hidden_size"], arch["vocab_size"]
    head_dim = arch.get("head_dim", hidden // arch["num_attention_heads"])
    q, kv = arch["num_attention_heads"] * head_dim, arch["num_key_value_heads"] * head_dim
    attention = hidden * q + 2 * hidden * kv + q * hidden
    attention += q + 2 * kv if arch["model_type"] == "qwen2" else 2 * head_dim
    layer = attention + 3 * hidden * arch["intermediate_size"] + 2 * hidden
    head = 0 if arch["tie_word_embeddings"] else vocab * hidden
    return vocab * hidden + head + arch["num_hidden_layers"] * layer + hidden


@pytest.fixture(scope="module")
def model_configs(tmp_path_factory):
    """hub id -> a directory holding that model's config.json."""
    import json

    folders = {}
    for hub_id, arch in ARCHITECTURES.items():
        folder = tmp_path_factory.mktemp(hub_id.split("/")[1])
        (folder / "config.json").write_text(json.dumps({**arch, "architectures": ["QwenForCausalLM"]}))
        folders[hub_id] = str(folder)
    return folders


def with_local_models(recipe: str, model_configs, overrides=()):
    config = compose(*GPU_NPD_CONFIGS[recipe], overrides)
    student = config.actor_rollout_ref.model.path
    teacher = config.distillation.teacher_models.teacher_model.model_path
    return compose(*GPU_NPD_CONFIGS[recipe], [
        f"actor_rollout_ref.model.path={model_configs[student]}",
        f"distillation.teacher_models.teacher_model.model_path={model_configs[teacher]}",
        *overrides,
    ]), student, teacher


@pytest.mark.parametrize("recipe", sorted(GPU_NPD_CONFIGS))
def test_engine_lengths_and_memory_fit_an_80_gb_gpu(recipe, model_configs):
    """The recipes log without wandb by default; the student's vLLM context is the longest prompt +
    response (not the model's 32-40k), the teacher's one token more (what verl's teacher check
    requires), both engines' steps bounded; by the memory estimate every process fits an 80 GiB
    GPU, with the numbers worked out by hand."""
    from verl_npd.trainer.memory import GIB, memory_needs, model_size

    config, student, teacher = with_local_models(recipe, model_configs)
    # No login needed by default; wandb is the override trainer.logger='[console,wandb]'.
    assert list(config.trainer.logger) == ["console", "tensorboard"]
    longest = config.data.max_prompt_length + config.data.max_response_length
    rollout = config.actor_rollout_ref.rollout
    assert rollout.max_model_len == longest and rollout.max_num_batched_tokens <= 4096
    if recipe in PAIRS:
        inference = config.distillation.teacher_models.teacher_model.inference
        assert inference.max_model_len == longest + 1 and inference.max_num_batched_tokens <= 4096
    for hub_id in (student, teacher):
        assert model_size(model_configs[hub_id]).parameters == hand_counted_parameters(ARCHITECTURES[hub_id])
    needs, unknown = memory_needs(config, 80 * GIB)
    assert not unknown and all(need.fits for need in needs), [need.line() for need in needs]
    trainer = next(need for need in needs if need.what == "a trainer rank")
    ranks = config.trainer.n_gpus_per_node * config.trainer.nnodes
    budget = config.actor_rollout_ref.actor.ppo_max_token_len_per_gpu
    arch = ARCHITECTURES[student]
    assert trainer.need_bytes == hand_counted_parameters(arch) * 16 // ranks + budget * arch["vocab_size"] * 12


def test_the_one_gpu_recipe_serves_its_teacher_as_the_config_says(model_configs):
    """run_teacher.sh starts the teacher with the memory share, port, name and lengths config/npd.yaml
    expects; the three shares of the one GPU add up; a 40 GiB GPU is too small, and the check says why."""
    from verl_npd.trainer.memory import GIB, memory_needs

    recipe = "qwen2.5_0.5b_from_7b_gsm8k_1gpu"
    config, _, teacher = with_local_models(recipe, model_configs)
    script = open(os.path.join(RECIPES, recipe, "run_teacher.sh")).read()
    command = script[script.index("exec vllm serve"):]

    def flag(name: str) -> str:
        return re.search(rf"--{name} (\S+)", command).group(1)

    served = config.npd.teacher
    assert command.startswith(f"exec vllm serve {teacher} ")
    assert float(flag("gpu-memory-utilization")) == served.gpu_memory_share
    assert f"http://{flag('host')}:{flag('port')}/v1" == served.url and flag("served-model-name") == served.model
    assert int(flag("max-model-len")) == config.data.max_prompt_length + config.data.max_response_length + 1
    assert int(flag("max-logprobs")) >= config.distillation.distillation_loss.topk
    assert served.gpu_memory_share + config.actor_rollout_ref.rollout.gpu_memory_utilization < 1
    needs, _ = memory_needs(config, 40 * GIB)
    assert [need.what for need in needs if not need.fits] == ["the teacher served on the trainer's GPU"]

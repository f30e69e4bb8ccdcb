"""Every recipe's configs compose, fit the GPUs their README declares (preflight's resource
arithmetic, nothing started), pass verl's own config validation, and each NPD config differs from
its OPD baseline only in the keys the recipe's README lists."""

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
    # The toy NPD config is main_npd's default.
    "toy_cpu": (TOY_CONFIG, "recipes/toy_cpu/config"),
}


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
    (npd_folder, npd_name), opd_folder = PAIRS[recipe]
    names = sorted(f[:-5] for f in os.listdir(os.path.join(REPO, opd_folder)) if f.startswith("opd_") and f.endswith(".yaml"))
    return [(npd_folder, npd_name), *((opd_folder, name) for name in names if name not in OWN_STEP_UNITS)]


@pytest.mark.parametrize("recipe", sorted(PAIRS))
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
        assert not {key for key in values if key.startswith("npd.") and ("steps" in key or "budget" in key)}


def declared_gpus(recipe: str) -> tuple[int, int]:
    """(trainer, teacher) GPUs from the recipe's row of recipes/README.md's table."""
    table = open(os.path.join(RECIPES, "README.md")).read()
    row = next(line for line in table.splitlines() if line.startswith(f"| [`{recipe}/`]"))
    trainer, teacher = re.search(r"(\d+) trainer \+ (\d+) teacher", row).groups()
    return int(trainer), int(teacher)


def test_every_recipe_is_checked():
    assert sorted(d for d in os.listdir(RECIPES) if os.path.isdir(os.path.join(RECIPES, d))) == sorted(PAIRS)


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


@pytest.mark.parametrize("recipe", sorted(PAIRS))
def test_configs_fit_the_declared_gpus_and_pass_verls_checks(toy_world, recipe):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from verl_npd.trainer.preflight import plan_resources

    (npd_folder, npd_name), opd_folder = PAIRS[recipe]
    for config in (compose(npd_folder, npd_name), compose(opd_folder, "opd_baseline")):
        validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
        pools = plan_resources(config)
        assert pools["standalone rollout"] == 0
        if recipe == "toy_cpu":
            assert sum(pools.values()) <= config.ray_kwargs.ray_init.num_gpus
        else:
            assert (pools["trainer"], pools["teacher"]) == declared_gpus(recipe)


@pytest.mark.parametrize(
    "recipe, overrides, pools",
    [
        # recipes/qwen2.5_0.5b_from_7b_gsm8k/README.md, "The 2-GPU variant".
        ("qwen2.5_0.5b_from_7b_gsm8k", ("trainer.n_gpus_per_node=1", "distillation.n_gpus_per_node=1"), (1, 1)),
        # README.md, "N GPUs, M nodes": the Qwen3 recipe on 2 nodes of 8 GPUs.
        ("qwen3_1.7b_from_8b_gsm8k_math", ("trainer.nnodes=2", "distillation.nnodes=2"), (12, 4)),
    ],
)
def test_documented_variants_fit(recipe, overrides, pools):
    from verl_npd.trainer.preflight import plan_resources

    for name in ("npd", "opd_baseline"):
        config = compose(f"recipes/{recipe}/config", name, overrides)
        assert plan_resources(config) == {"trainer": pools[0], "teacher": pools[1], "standalone rollout": 0}


@pytest.mark.parametrize(
    "overrides, problem",
    [
        (("trainer.n_gpus_per_node=5",), "192 samples per step cannot be split evenly over the trainer's 5 data-parallel"),
        (("actor_rollout_ref.rollout.tensor_model_parallel_size=4",), "the rollout's 6 GPUs (trainer.n_gpus_per_node"),
        (("distillation.teacher_models.teacher_model.inference.tensor_model_parallel_size=3",), "distillation: Single teacher's per_replica_world_size (3) must divide"),
        (("actor_rollout_ref.actor.ulysses_sequence_parallel_size=4",), "cannot form groups of"),
    ],
)
def test_resource_arithmetic_names_the_split_that_fails(overrides, problem):
    from verl_npd.trainer.preflight import PreflightError, plan_resources

    config = compose("recipes/qwen3_1.7b_from_8b_gsm8k_math/config", "npd", overrides)
    with pytest.raises(PreflightError, match=re.escape(problem)):
        plan_resources(config)

"""The toy task's reward, plugged into verl through ``reward.custom_reward_function``.

verl 0.9.1 has no registry of score functions by ``data_source``: its fallback
``verl.utils.reward_score.default_compute_score`` is a fixed if/elif chain that raises
NotImplementedError for unknown sources, and its reward-manager registry selects the manager
class, not the score function. The supported way to add a task's reward is the config:

    reward.custom_reward_function.path=pkg://verl_npd.toy.reward
    reward.custom_reward_function.name=compute_score

(``pkg://`` makes verl import this module by name, so the path works wherever verl-npd is
installed; see ``verl.utils.import_utils.load_module``).
This module stays import-light (no torch): verl's reward workers import it.
"""

from verl_npd.toy.task import DATA_SOURCE, score

REWARD_FUNCTION_NAME = "compute_score"


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None, **kwargs) -> float:
    """1.0 if the response's "Answer: N" equals ``ground_truth`` exactly, else 0.0.

    Other data sources go to verl's default scorer, so a mixed dataset still works with this
    function set as the custom reward.
    """
    if data_source == DATA_SOURCE:
        return score(solution_str, ground_truth)
    from verl.utils.reward_score import default_compute_score

    return default_compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs)


def reward_function_path() -> str:
    """The value for ``reward.custom_reward_function.path``: this module, as a ``pkg://`` path."""
    return "pkg://verl_npd.toy.reward"


def reward_overrides() -> list[str]:
    """The Hydra overrides that make verl score the toy task with :func:`compute_score`."""
    return [
        f"reward.custom_reward_function.path={reward_function_path()}",
        f"reward.custom_reward_function.name={REWARD_FUNCTION_NAME}",
    ]

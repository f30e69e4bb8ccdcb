"""The toy task: a 2-digit number plus or minus one or two 1-digit numbers, with a worked answer.

Prompt:   "Compute 47+8-6."
Response: "47+8=55. 55-6=49. Answer: 49"

Every digit is one token (see tokenizer.py), so the model has to learn digit-level carries and
borrows; writing each intermediate result makes every step a local computation that a tiny
transformer can learn. About 27k distinct train and 3.8k val problems exist.
Pure Python on purpose: the reward and the data generation must not import torch.
"""

import random
import re
import zlib
from dataclasses import dataclass

DATA_SOURCE = "npd_toy_arith"
ABILITY = "arithmetic"
ANSWER_PREFIX = "Answer: "
# The first operand has 2 digits, the others 1 (sized so that a ~0.5M-parameter model learns the task
# to >90% in a couple of CPU minutes). Intermediate results stay non-negative so that no minus sign
# ever precedes a number: the task is about carries and borrows, not signs.
FIRST_OPERAND = (10, 99)
OTHER_OPERANDS = (1, 9)
# Fraction of 3-operand problems; the rest have 2 operands.
THREE_OPERAND_FRACTION = 0.75
# One problem in VAL_MODULUS goes to validation, chosen by a hash of its text, so the splits are
# disjoint whatever seeds and sizes are used.
VAL_MODULUS = 8
_ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)")


@dataclass(frozen=True)
class Problem:
    """One problem: the user prompt, the worked response and the final answer string."""

    prompt: str
    response: str
    answer: str


def split_of(prompt: str) -> str:
    """Return "val" or "train" from a stable hash of the prompt text (never from the seed)."""
    return "val" if zlib.crc32(prompt.encode()) % VAL_MODULUS == 0 else "train"


def _sample_problem(rng: random.Random) -> Problem:
    """Draw operands and operators until every intermediate result is non-negative."""
    n_operands = 3 if rng.random() < THREE_OPERAND_FRACTION else 2
    while True:
        numbers = [rng.randint(*FIRST_OPERAND)] + [rng.randint(*OTHER_OPERANDS) for _ in range(n_operands - 1)]
        ops = [rng.choice("+-") for _ in range(n_operands - 1)]
        value, steps = numbers[0], []
        for op, number in zip(ops, numbers[1:]):
            new_value = value + number if op == "+" else value - number
            steps.append(f"{value}{op}{number}={new_value}.")
            value = new_value
            if value < 0:
                break
        if value >= 0:
            break
    expression = str(numbers[0]) + "".join(op + str(n) for op, n in zip(ops, numbers[1:]))
    return Problem(
        prompt=f"Compute {expression}.",
        response=" ".join(steps) + f" {ANSWER_PREFIX}{value}",
        answer=str(value),
    )


def generate_problems(n: int, seed: int, split: str) -> list[Problem]:
    """Return ``n`` distinct problems of ``split`` ("train" or "val"), deterministic in ``seed``.

    There are about 27k distinct train and 3.8k val problems; asking for more raises ValueError.
    """
    assert split in ("train", "val"), split
    rng = random.Random(f"{split}-{seed}")
    problems, seen = [], set()
    # Generous bound: drawing stays cheap until ``n`` nears the size of the split.
    for _ in range(100 * n + 100_000):
        problem = _sample_problem(rng)
        if split_of(problem.prompt) == split and problem.prompt not in seen:
            seen.add(problem.prompt)
            problems.append(problem)
            if len(problems) == n:
                return problems
    raise ValueError(f"could not draw {n} distinct {split} problems (the split is too small)")


def expression_of(prompt: str) -> str:
    """The arithmetic expression inside a prompt, e.g. "47+86-29" (used by tests to ``eval``)."""
    return prompt.removeprefix("Compute ").removesuffix(".")


def extract_answer(text: str) -> str | None:
    """The number after the first "Answer:" in ``text``, or None when there is none.

    The first, because that is the answer the model committed to; anything after it is rambling
    past a missed end-of-sequence token.
    """
    match = _ANSWER_RE.search(text)
    return match.group(1) if match else None


def score(solution_str: str, ground_truth: str) -> float:
    """1.0 when the extracted answer equals ``ground_truth`` exactly, else 0.0."""
    return 1.0 if extract_answer(solution_str) == str(ground_truth).strip() else 0.0

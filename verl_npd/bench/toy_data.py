"""Data the toy benchmark makes itself, with transformers on the CPU: the validation subset, the
teacher's accuracy on it, the teacher's responses that SFT trains on, and the accuracy of SFT's
checkpoints.

Accuracy here is the toy world's greedy exact match (``verl_npd.toy.evaluate_accuracy``): the same
decoding and score as the validation of the NPD and verl runs (temperature 0, ``Answer: N`` equals
the ground truth), so all methods are measured alike.
"""

from __future__ import annotations

import glob
import json
import os
import re
import time

import numpy as np
import pandas as pd


def validation_set(world, size: int, out_dir: str) -> str:
    """``size`` held-out prompts of the toy task as a parquet under ``out_dir``: the world's
    ``val.parquet`` (its first ``size`` rows when that is enough), then further problems of the
    validation split, drawn after the world's own validation and warm-up (dev) prompts, so that
    none was trained on (the splits are disjoint by a hash of the prompt) and none decided when the
    student's warm-up stopped. The draw is the world's own (same seed), so it repeats exactly."""
    from verl_npd.toy.task import generate_problems
    from verl_npd.toy.world import manifest_of, write_parquet

    frame = pd.read_parquet(world.val_parquet)
    path = os.path.join(out_dir, f"val_{size}.parquet")
    if size <= len(frame):
        frame.head(size).to_parquet(path, index=False)
        return path
    build = manifest_of(world)["config"]
    n_val, n_dev = build["n_val_prompts"], build["n_dev_prompts"]
    problems = generate_problems(n_val + n_dev + size - len(frame), build["seed"], "val")
    world_prompts = [messages[-1]["content"] for messages in frame["prompt"]]
    if [p.prompt for p in problems[: len(frame)]] != world_prompts:
        raise ValueError(f"{world.val_parquet} is not the draw of its world's build config; rebuild the toy world")
    write_parquet(problems[:n_val] + problems[n_val + n_dev :], "val", path)
    return path


def model_accuracy(model_dir: str, val_parquet: str) -> float:
    from transformers import AutoTokenizer

    from verl_npd.toy import evaluate_accuracy, read_problems

    prompts, answers = read_problems(val_parquet)
    return evaluate_accuracy(model_dir, AutoTokenizer.from_pretrained(model_dir), prompts, answers)


def sampled_prompt_order(dataset_size: int, n_prompts: int, seed: int) -> list[int]:
    """``n_prompts`` dataset indices: seeded permutations of the whole set, one after the other (the
    next epoch starts when one is used up, as the other methods' samplers do)."""
    rng = np.random.default_rng(seed)
    epochs = -(-n_prompts // dataset_size)
    return np.concatenate([rng.permutation(dataset_size) for _ in range(epochs)])[:n_prompts].tolist()


def teacher_responses(
    teacher_dir: str, train_parquet: str, n_prompts: int, seed: int, cache_dir: str
) -> tuple[str, float]:
    """The teacher's greedy responses to ``n_prompts`` training prompts in the order of
    ``sampled_prompt_order``, as a parquet of chat ``messages`` (verl's SFT format), and the seconds
    it took to make them (one response per distinct prompt: greedy decoding repeats itself).

    The seed picks the prompts, as it picks the prompt order of the other methods: verl's SFT trainer
    shuffles its data with a fixed seed of its own, so without this every seed would train on the
    same batches. Greedy, as in sequence-level knowledge distillation: the teacher's best answer,
    which is also how its accuracy is measured. Made once and reused while teacher, prompts, count and
    seed stay the same (the file's ``.json`` sidecar keeps the generation time of the run that made
    it).
    """
    path = os.path.join(cache_dir, f"teacher_responses_{n_prompts}_seed{seed}.parquet")
    meta_path = path + ".json"
    key = {
        "teacher_dir": os.path.realpath(teacher_dir),
        "train_parquet": os.path.realpath(train_parquet),
        "n_prompts": n_prompts,
        "seed": seed,
    }
    if os.path.exists(path) and os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if {k: meta.get(k) for k in key} == key:
            return path, meta["generation_s"]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verl_npd.toy import greedy_generate, read_problems

    prompts, _ = read_problems(train_parquet)
    order = sampled_prompt_order(len(prompts), n_prompts, seed)
    unique = sorted(set(order))
    start = time.perf_counter()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    responses = greedy_generate(teacher, AutoTokenizer.from_pretrained(teacher_dir), [prompts[i] for i in unique])
    generation_s = time.perf_counter() - start
    response_of = dict(zip(unique, responses))
    messages = [
        [{"role": "user", "content": prompts[i]}, {"role": "assistant", "content": response_of[i]}] for i in order
    ]
    os.makedirs(cache_dir, exist_ok=True)
    pd.DataFrame({"messages": messages}).to_parquet(path, index=False)
    with open(meta_path, "w") as f:
        json.dump({**key, "generation_s": generation_s}, f, indent=2)
    return path, generation_s


def evaluate_sft_run(run_dir: str, student_dir: str, val_parquet: str) -> list[dict]:
    """Accuracy of the untrained student (step 0) and of every checkpoint of an SFT run, with the
    seconds each evaluation took; written to ``run_dir/evaluations.json`` and returned."""
    evaluations = []
    checkpoints = {0: student_dir}
    for path in glob.glob(os.path.join(run_dir, "checkpoints", "global_step_*", "huggingface")):
        checkpoints[int(re.search(r"global_step_(\d+)", path).group(1))] = path
    for step in sorted(checkpoints):
        start = time.perf_counter()
        accuracy = model_accuracy(checkpoints[step], val_parquet)
        evaluations.append({"step": step, "accuracy": accuracy, "eval_s": time.perf_counter() - start})
    with open(os.path.join(run_dir, "evaluations.json"), "w") as f:
        json.dump(evaluations, f, indent=2)
    return evaluations

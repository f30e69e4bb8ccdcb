"""Tests of the embedded toy world (verl_npd.toy).

The world is built once at the default cache location (``$VERL_NPD_HOME/toy-v1``, a few CPU
minutes the first time) and shared with every other test file; the checks below re-measure what
matters instead of trusting the manifest.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from verl_npd.toy import task
from verl_npd.toy.config import STUDENT_DISTILL_LR
from verl_npd.toy import world as world_module
from verl_npd.toy.reward import compute_score, reward_function_path, reward_overrides
from verl_npd.toy.task import expression_of, extract_answer, generate_problems
from verl_npd.toy.world import ensure_toy_world, manifest_of, read_problems

STEP_RE = re.compile(r"(\d+)([+-])(\d+)=(\d+)\.")


@pytest.fixture(scope="session")
def world():
    return ensure_toy_world()


@pytest.fixture(scope="session")
def tokenizer(world):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(world.tokenizer_dir)


# ----------------------------------------------------------------------------- task and reward


def test_problems_are_correct_by_python_eval():
    for split in ("train", "val"):
        for p in generate_problems(500, seed=3, split=split):
            assert p.answer == str(eval(expression_of(p.prompt)))
            assert p.prompt == f"Compute {expression_of(p.prompt)}."
            steps = STEP_RE.findall(p.response)
            assert 1 <= len(steps) <= 2
            for a, op, b, c in steps:
                assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
            # Each step starts from the previous result; the last result is the answer.
            assert [s[0] for s in steps[1:]] == [s[3] for s in steps[:-1]]
            assert steps[-1][3] == p.answer
            assert p.response.endswith(f"Answer: {p.answer}")
            assert extract_answer(p.response) == p.answer


def test_problems_deterministic_distinct_and_splits_disjoint():
    train = generate_problems(2000, seed=0, split="train")
    assert train == generate_problems(2000, seed=0, split="train")
    assert train != generate_problems(2000, seed=1, split="train")
    val = generate_problems(500, seed=0, split="val")
    assert len({p.prompt for p in train}) == 2000 and len({p.prompt for p in val}) == 500
    assert not {p.prompt for p in train} & {p.prompt for p in val}
    with pytest.raises(ValueError):
        generate_problems(10_000, seed=0, split="val")  # more than the val split holds


@pytest.mark.parametrize(
    "text, expected",
    [
        ("47+86=133. 133-29=104. Answer: 104", 1.0),  # only the answer is checked
        ("Answer: 104", 1.0),
        ("47+86=133. 133-29=104. Answer: 105", 0.0),  # wrong
        ("47+86=133. 133-29=104. Answer: 1040", 0.0),  # wrong, longer number
        ("47+86=133. 133-29=104.", 0.0),  # no answer
        ("Answer: ", 0.0),
        ("Answer: abc", 0.0),
        ("104", 0.0),
        ("", 0.0),
        ("Answer: 104 Answer: 7", 1.0),  # the first committed answer counts
    ],
)
def test_reward(text, expected):
    assert compute_score("npd_toy_arith", text, "104") == expected
    assert compute_score("npd_toy_arith", text, "104", extra_info={"split": "val"}, unused_kwarg=1) == expected


def test_reward_loads_the_verl_way():
    """verl's own loader resolves the config path we hand out, and calls it as its reward managers do."""
    from omegaconf import OmegaConf

    from verl.trainer.ppo.reward import get_custom_reward_fn

    overrides = dict(o.split("=", 1) for o in reward_overrides())
    assert overrides["reward.custom_reward_function.path"] == reward_function_path()
    config = OmegaConf.create(
        {"reward": {"custom_reward_function": {"path": reward_function_path(), "name": "compute_score"}}}
    )
    fn = get_custom_reward_fn(config)
    kwargs = dict(data_source="npd_toy_arith", ground_truth="58", extra_info={"index": 0})
    assert fn(solution_str="55+2=57. 57+1=58. Answer: 58", **kwargs) == 1.0
    assert fn(solution_str="55+2=57. 57+1=58. Answer: 59", **kwargs) == 0.0
    # Other data sources fall through to verl's default scorer.
    assert fn(data_source="openai/gsm8k", solution_str="so #### 72", ground_truth="72") == 1.0


def test_reward_import_is_cheap():
    """verl's reward workers import the reward module by name: it must not pull torch in."""
    code = (
        "import sys; import verl_npd.toy; import verl_npd.toy.reward; "
        "heavy = [m for m in ('torch', 'transformers', 'pandas') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_chat_template(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for p in generate_problems(200, seed=5, split="train"):
        for text in (p.prompt, p.response):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(ids) == text
            assert tokenizer.unk_token_id not in ids
        # Digits are single tokens: one token per character of the expression.
        expression = expression_of(p.prompt)
        assert len(tokenizer(expression, add_special_tokens=False)["input_ids"]) == len(expression)

    messages = [{"role": "user", "content": "Compute 47+8-6."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nCompute 47+8-6.<|im_end|>\n<|im_start|>assistant\n"
    no_gen = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert no_gen == "<|im_start|>user\nCompute 47+8-6.<|im_end|>\n"
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
    assert tokenizer.decode(ids) == text
    assert len(ids) <= 24
    # A full response with EOS decodes back without the special token.
    response = "47+8=55. 55-6=49. Answer: 49"
    ids = tokenizer(response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and len(ids) <= 32
    assert tokenizer.decode(ids, skip_special_tokens=True) == response


# ----------------------------------------------------------------------------- the built world


def test_world_files_and_model_shapes(world, tokenizer):
    from transformers import AutoConfig, GenerationConfig

    for path in (world.tokenizer_dir, world.teacher_dir, world.student_dir):
        assert os.path.isdir(path)
    configs = {d: AutoConfig.from_pretrained(d) for d in (world.teacher_dir, world.student_dir)}
    for model_dir, config in configs.items():
        assert config.model_type == "qwen2" and config.architectures == ["Qwen2ForCausalLM"]
        assert config.vocab_size == len(tokenizer)
        assert config.head_dim in (32, 64, 80, 96, 112, 128)  # vLLM CPU attention
        assert config.num_attention_heads * config.head_dim == config.hidden_size
        assert config.num_attention_heads % config.num_key_value_heads == 0
        assert config.max_position_embeddings >= 128
        assert str(config.dtype).endswith("float32")
        assert config.eos_token_id == tokenizer.eos_token_id
        generation = GenerationConfig.from_pretrained(model_dir)
        assert generation.eos_token_id == tokenizer.eos_token_id and generation.pad_token_id == tokenizer.pad_token_id
        assert os.path.exists(os.path.join(model_dir, "model.safetensors"))
        assert os.path.exists(os.path.join(model_dir, "tokenizer.json"))
    teacher, student = configs[world.teacher_dir], configs[world.student_dir]
    assert not teacher.tie_word_embeddings and not student.tie_word_embeddings
    assert student.hidden_size < teacher.hidden_size and student.num_hidden_layers <= teacher.num_hidden_layers

    manifest = manifest_of(world)
    assert manifest["teacher"]["parameters"] > 2 * manifest["student"]["parameters"]
    assert world.teacher_accuracy == manifest["teacher"]["accuracy"]


def test_model_dir_tokenizers_match(world, tokenizer):
    """verl loads the tokenizer from the model path, where transformers picks Qwen2Tokenizer because
    of the qwen2 config: it must encode exactly like the tokenizer directory."""
    from transformers import AutoTokenizer

    problems = generate_problems(100, seed=6, split="val")
    messages = [[{"role": "user", "content": p.prompt}] for p in problems]
    for model_dir in (world.teacher_dir, world.student_dir):
        other = AutoTokenizer.from_pretrained(model_dir)
        assert len(other) == len(tokenizer) and other.eos_token_id == tokenizer.eos_token_id
        for p, m in zip(problems, messages):
            assert other(p.response)["input_ids"] == tokenizer(p.response)["input_ids"]
            assert other.apply_chat_template(m, add_generation_prompt=True, tokenize=False) == (
                tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
            )


def test_world_is_cached(world):
    start = time.time()
    again = ensure_toy_world()
    assert time.time() - start < 0.5
    assert again == world


def test_teacher_is_accurate_and_student_weaker(world, tokenizer):
    """Re-measured here on the held-out prompts, with answers from Python's eval, not the parquet."""
    from verl_npd.toy.models import evaluate_accuracy

    prompts, _ = read_problems(world.val_parquet)
    train_prompts, _ = read_problems(world.train_parquet)
    assert not set(prompts) & set(train_prompts)
    answers = [str(eval(expression_of(p))) for p in prompts]
    teacher = evaluate_accuracy(world.teacher_dir, tokenizer, prompts, answers)
    student = evaluate_accuracy(world.student_dir, tokenizer, prompts, answers)
    print(f"teacher {teacher:.3f}, student {student:.3f} on {len(prompts)} val prompts")
    assert teacher >= 0.9
    assert 0.1 <= student <= 0.55
    assert teacher - student >= 0.35
    # Measured at build time on the same prompts: greedy decoding is deterministic.
    assert abs(teacher - world.teacher_accuracy) < 0.02 and abs(student - world.student_accuracy) < 0.02


def test_student_knows_the_format(world, tokenizer):
    from transformers import AutoModelForCausalLM

    from verl_npd.toy.models import greedy_generate

    prompts, _ = read_problems(world.val_parquet)
    model = AutoModelForCausalLM.from_pretrained(world.student_dir)
    completions = greedy_generate(model, tokenizer, prompts[:128])
    formatted = [c for c in completions if re.fullmatch(r"(\d+[+-]\d+=\d+\. )+Answer: \d+", c)]
    assert len(formatted) >= 0.9 * len(completions)


def test_student_improves_when_distilled(world, tokenizer):
    """30 SFT steps (batch 32) on the teacher's greedy answers lift the student clearly.

    The optimizer mirrors verl's default actor optimizer (AdamW, betas (0.9, 0.999), constant lr, no
    warm-up), at the lr recommended for distilling into the toy student.
    """
    from transformers import AutoModelForCausalLM

    from verl_npd.toy.models import evaluate_accuracy, greedy_generate, train_sft
    from verl_npd.toy.task import Problem

    train_prompts, train_answers = read_problems(world.train_parquet)
    val_prompts, val_answers = read_problems(world.val_parquet)
    teacher = AutoModelForCausalLM.from_pretrained(world.teacher_dir)
    teacher_responses = greedy_generate(teacher, tokenizer, train_prompts[:1024])
    data = [Problem(p, r, a) for p, r, a in zip(train_prompts, teacher_responses, train_answers)]
    student = AutoModelForCausalLM.from_pretrained(world.student_dir)
    before = evaluate_accuracy(student, tokenizer, val_prompts, val_answers)
    train_sft(student, tokenizer, data, steps=30, batch_size=32, lr=STUDENT_DISTILL_LR, warmup_steps=0, betas=(0.9, 0.999), quiet=True)
    after = evaluate_accuracy(student, tokenizer, val_prompts, val_answers)
    print(f"student {before:.3f} -> {after:.3f} after 30 distillation-like SFT steps")
    assert after - before >= 0.1


def test_parquet_loads_in_verl_rlhf_dataset(world, tokenizer, tmp_path):
    from omegaconf import OmegaConf

    from verl.utils.dataset.rl_dataset import RLHFDataset

    config = OmegaConf.create(
        {"max_prompt_length": 24, "filter_overlong_prompts": True, "cache_dir": str(tmp_path), "truncation": "error"}
    )
    for path, split in ((world.train_parquet, "train"), (world.val_parquet, "val")):
        dataset = RLHFDataset(data_files=path, tokenizer=tokenizer, config=config)
        manifest = manifest_of(world)["config"]
        assert len(dataset) == manifest["n_train_prompts" if split == "train" else "n_val_prompts"]  # none too long
        item = dataset[3]
        assert item["data_source"] == "npd_toy_arith"
        assert item["raw_prompt"][0]["role"] == "user" and item["raw_prompt"][0]["content"].startswith("Compute ")
        assert item["reward_model"] == {"style": "rule", "ground_truth": str(eval(expression_of(item["raw_prompt"][0]["content"])))}
        assert item["extra_info"]["split"] == split and item["index"] == 3
        assert compute_score(item["data_source"], item["extra_info"]["response"], item["reward_model"]["ground_truth"]) == 1.0


# ----------------------------------------------------------------------------- locking and atomic build


def _fake_build(calls: list, fail: bool = False):
    """A stand-in for build_world that takes a moment and writes a minimal valid world."""

    def build(out_dir, config, *, quiet=False):
        calls.append(out_dir)
        time.sleep(0.3)
        if fail:
            raise RuntimeError("build failed")
        paths = {
            k: k for k in ("tokenizer_dir", "teacher_dir", "student_dir", "train_parquet", "val_parquet")
        }
        manifest = {"paths": paths, "teacher": {"accuracy": 0.99}, "student": {"accuracy": 0.3}}
        with open(os.path.join(out_dir, world_module.MANIFEST), "w") as f:
            json.dump(manifest, f)
        return manifest

    return build


def test_concurrent_callers_build_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(world_module, "build_world", _fake_build(calls))
    root = str(tmp_path / "world")
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_toy_world(root, quiet=True))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3 and len(set(results)) == 1
    assert results[0].root == root and results[0].teacher_dir == os.path.join(root, "teacher_dir")
    assert sorted(os.listdir(tmp_path)) == ["world", "world.lock"]  # no temp dir left behind


def test_failed_build_leaves_nothing_that_looks_built(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(world_module, "build_world", _fake_build(calls, fail=True))
    root = str(tmp_path / "world")
    with pytest.raises(RuntimeError):
        ensure_toy_world(root, quiet=True)
    assert not os.path.exists(root) and os.listdir(tmp_path) == ["world.lock"]
    # A crashed build's temp dir is swept by the next build; a foreign directory is never touched.
    os.makedirs(root + world_module._BUILDING_INFIX + "crashed")
    monkeypatch.setattr(world_module, "build_world", _fake_build(calls))
    assert ensure_toy_world(root, quiet=True).student_accuracy == 0.3
    assert sorted(os.listdir(tmp_path)) == ["world", "world.lock"]
    foreign = str(tmp_path / "foreign")
    os.makedirs(foreign)
    open(os.path.join(foreign, "keep.txt"), "w").close()
    with pytest.raises(FileExistsError):
        ensure_toy_world(foreign, quiet=True)
    assert os.listdir(foreign) == ["keep.txt"]


def test_default_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VERL_NPD_HOME", str(tmp_path))
    assert world_module.default_root() == os.path.join(str(tmp_path), "toy-v1")
    monkeypatch.delenv("VERL_NPD_HOME")
    assert world_module.default_root() == os.path.expanduser("~/.cache/verl_npd/toy-v1")


def test_task_constants_match_the_parquet(world):
    import pandas as pd

    frame = pd.read_parquet(world.val_parquet)
    assert list(frame.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert set(frame["data_source"]) == {task.DATA_SOURCE}

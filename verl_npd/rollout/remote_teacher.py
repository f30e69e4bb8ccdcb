"""A teacher served elsewhere: prefill scoring through an OpenAI-compatible completions endpoint.

``HTTPTeacher.score`` has the interface of :class:`verl_npd.rollout.scoring.ServerPool`'s, so the
rollout manager scores with it as with a teacher replica (``npd.teacher.url``). It speaks the part
of vLLM's OpenAI-compatible completions API that scoring needs, checked against vLLM's own server
code (``vllm/entrypoints/openai/completion/protocol.py`` of vLLM's main branch at commit
002032ee2b18; the -inf clamp is ``clamp_prompt_logprobs`` in its serving code):

* request: ``POST {url}/completions`` with ``prompt`` a list of token ids (``CompletionRequest.prompt``
  accepts ``list[int]``), ``prompt_logprobs`` = k and ``max_tokens`` = 1 (vLLM turns
  ``max_tokens`` 0 into 1 only together with ``echo``; one generated token is the cheapest plain
  request), ``temperature`` 1;
* response: ``choices[0].prompt_logprobs``, one entry per prompt token, the first null (nothing
  scores the first token), then ``{token_id: {"logprob", "rank", "decoded_token"}}`` with the k
  most likely tokens (ranks 1..k) plus the prompt's actual token whatever its rank (so k or k+1
  entries; JSON turns the ids into strings); log-probs of -inf arrive as -9999.0.

Entry i of vLLM's list scores token i; verl's layout (:class:`PromptScores`) has entry t score token
t+1 and a zero pad row last, so the rows shift by one. A teacher's embedding matrix may be padded
beyond its tokenizer (Qwen2.5-7B: 152,064 rows for 151,665 tokens; its student Qwen2.5-0.5B has
151,936), and a plain ``vllm serve`` scores those rows too; verl's own vLLM server masks every id at or
beyond the tokenizer's size (``monkey_patch_compute_logits``, verl/workers/rollout/vllm_rollout/
utils.py:106-131, called with ``len(tokenizer)`` at vllm_async_server.py:500-506). Such an id among the
top k is kept as a zero-probability entry (id 0, log-prob -inf) instead: the student's logits may have
no row for it. Failures: a request that times out, cannot
connect or gets a 5xx/408/429 answer is retried with exponential backoff for up to ``max_wait_s``
(a teacher server restarting is waited for); any other HTTP error and any malformed answer fail at
once with a message naming the URL. ``score`` returns every sequence's scores or raises: a wave is
never trained on half-scored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from verl_npd.rollout.scoring import PromptScores

logger = logging.getLogger("verl_npd")

# Answers worth asking again: the server is overloaded, restarting or timed out.
_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 30.0


class TeacherRequestError(RuntimeError):
    """The served teacher answered something NPD cannot use, or stayed unreachable too long."""


class _Retryable(Exception):
    """A failure that may pass: the server is unreachable, restarting or overloaded."""


def completion_request(model: str | None, sequence: Sequence[int], num_logprobs: int) -> dict[str, Any]:
    """The body of one scoring request (module docstring)."""
    body: dict[str, Any] = {
        "prompt": [int(t) for t in sequence],
        "max_tokens": 1,
        "temperature": 1.0,
        "prompt_logprobs": num_logprobs,
    }
    if model is not None:
        body["model"] = model
    return body


def parse_prompt_logprobs(
    response: Any, sequence: Sequence[int], num_logprobs: int, url: str, num_valid_tokens: int | None = None
) -> PromptScores:
    """One completion response to :class:`PromptScores` (verl's layout); a clear error naming
    ``url`` when it is not what vLLM's server returns for ``completion_request``. Top-k ids at or
    beyond ``num_valid_tokens`` (the tokenizer's size) become zero-probability entries."""

    def malformed(why: str) -> TeacherRequestError:
        return TeacherRequestError(f"malformed prompt_logprobs answer from {url}: {why}")

    try:
        entries = response["choices"][0]["prompt_logprobs"]
    except (KeyError, IndexError, TypeError):
        raise malformed("no choices[0].prompt_logprobs (does the server support vLLM's prompt_logprobs?)") from None
    n = len(sequence)
    if not isinstance(entries, list) or len(entries) != n:
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise malformed(f"{got} prompt_logprobs entries for a prompt of {n} tokens")
    width = max(num_logprobs, 1)
    topk_ids = torch.zeros(n, width, dtype=torch.int32)
    topk_log_probs = torch.zeros(n, width, dtype=torch.float32)
    token_log_probs: list[float] = []
    for i in range(1, n):
        entry = entries[i]
        if not isinstance(entry, dict):
            raise malformed(f"entry {i} is {type(entry).__name__}, not a dict of token id to log-prob")
        try:
            scored = [(int(t), float(v["logprob"]), int(v["rank"])) for t, v in entry.items()]
        except (KeyError, TypeError, ValueError) as e:
            raise malformed(f"entry {i}: {e!r}") from None
        actual = int(sequence[i])
        by_id = {t: lp for t, lp, _ in scored}
        if actual not in by_id:
            raise malformed(f"entry {i} lacks the prompt's token {actual}")
        token_log_probs.append(by_id[actual])
        if num_logprobs == 0:
            # As verl's layout has it for k=0: the actual token stands in the top-k slot.
            chosen = [(actual, by_id[actual])]
        else:
            # The k ranked first; the actual token is an extra entry unless it is one of them.
            ranked = sorted(scored, key=lambda s: (s[2], -s[1]))[:num_logprobs]
            if len(ranked) < num_logprobs or ranked[-1][2] > num_logprobs:
                raise malformed(f"entry {i} has fewer than the {num_logprobs} top log-probs asked for")
            chosen = [(t, lp) for t, lp, _ in ranked]
            if num_valid_tokens is not None:
                chosen = [(t, lp) if t < num_valid_tokens else (0, float("-inf")) for t, lp in chosen]
        topk_ids[i - 1] = torch.tensor([t for t, _ in chosen], dtype=torch.int32)
        topk_log_probs[i - 1] = torch.tensor([lp for _, lp in chosen], dtype=torch.float32)
    return PromptScores(topk_ids=topk_ids, topk_log_probs=topk_log_probs, token_log_probs=token_log_probs)


class HTTPTeacher:
    """Prefill scoring on a served teacher; ``score`` as :meth:`ServerPool.score`.

    Args:
        url: the API base, e.g. ``http://host:8000/v1`` (``/completions`` is appended).
        model: the served model's name (the request's ``model``); None lets the server pick its only one.
        api_key: sent as ``Authorization: Bearer``; None sends none.
        max_concurrency: requests in flight at once, over every ``score`` call.
        timeout_s: per request, before it counts as a failed attempt.
        max_wait_s: how long a request keeps being retried while the server is unreachable,
            restarting or overloaded, before the run fails.
        num_valid_tokens: the tokenizer's size: larger top-k ids are masked (module docstring);
            None keeps every id.
    """

    def __init__(
        self,
        url: str,
        model: str | None,
        api_key: str | None,
        max_concurrency: int,
        timeout_s: float,
        max_wait_s: float,
        num_valid_tokens: int | None = None,
    ):
        self.url = url.rstrip("/")
        self.endpoint = f"{self.url}/completions"
        self.model = model
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_wait_s = max_wait_s
        self.num_valid_tokens = num_valid_tokens
        self.retries = 0  # attempts that failed and were made again
        # The limit on requests in flight, shared by concurrent ``score`` calls; an asyncio
        # semaphore belongs to one event loop (the rollout manager runs its own, each test its own).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None

    async def score(self, sequences: Sequence[Sequence[int]], num_logprobs: int) -> list[PromptScores]:
        """Prefill every sequence on the served teacher; its scores, in order. Raises
        :class:`TeacherRequestError` if any sequence cannot be scored."""
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._slots = loop, asyncio.Semaphore(self.max_concurrency)
        # A session per call (a wave's worth of requests on kept-alive connections): it never
        # outlives the event loop it was made in.
        async with aiohttp.ClientSession(
            headers=self.headers,
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            connector=aiohttp.TCPConnector(limit=self.max_concurrency),
        ) as session:
            return list(await asyncio.gather(*[self._score_one(session, s, num_logprobs) for s in sequences]))

    async def _score_one(self, session, sequence: Sequence[int], num_logprobs: int) -> PromptScores:
        body = completion_request(self.model, sequence, num_logprobs)
        deadline = time.monotonic() + self.max_wait_s
        backoff = _FIRST_BACKOFF_S
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._slots:
                    answer = await self._post(session, body)
                return parse_prompt_logprobs(answer, sequence, num_logprobs, self.endpoint, self.num_valid_tokens)
            except _Retryable as e:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TeacherRequestError(
                        f"the teacher at {self.endpoint} failed for {self.max_wait_s:.0f}s "
                        f"(npd.teacher.max_wait_s), {attempt} attempts: {e}"
                    ) from None
                self.retries += 1
                logger.warning(
                    "verl-npd: teacher at %s: %s (attempt %d; retrying in %.1fs, giving up in %.0fs)",
                    self.endpoint, e, attempt, min(backoff, left), left,
                )
                await asyncio.sleep(min(backoff, left))
                backoff = min(backoff * 2, _MAX_BACKOFF_S)

    async def _post(self, session, body: dict[str, Any]) -> Any:
        import aiohttp

        try:
            async with session.post(self.endpoint, data=json.dumps(body)) as response:
                text = await response.text()
                status = response.status
        except (asyncio.TimeoutError, TimeoutError):
            raise _Retryable(f"no answer within {self.timeout_s:.0f}s (npd.generation.request_timeout_s)") from None
        except aiohttp.ClientError as e:
            raise _Retryable(f"{type(e).__name__}: {e}") from None
        if status in _RETRYABLE_STATUS:
            raise _Retryable(f"HTTP {status}: {text[:200]}")
        if status != 200:
            raise TeacherRequestError(f"the teacher at {self.endpoint} answered HTTP {status}: {text[:500]}")
        try:
            return json.loads(text)
        except ValueError:
            raise TeacherRequestError(f"malformed answer from {self.endpoint}: not JSON: {text[:200]!r}") from None


def teacher_api_key(api_key_env: str | None) -> str | None:
    """The key in the environment variable ``npd.teacher.api_key_env`` names; a clear error if unset."""
    if api_key_env is None:
        return None
    key = os.environ.get(api_key_env)
    if not key:
        raise ValueError(f"npd.teacher.api_key_env={api_key_env!r} but that environment variable is not set")
    return key


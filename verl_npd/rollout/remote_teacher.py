"""A teacher served elsewhere: prefill scoring over HTTP on one or more teacher servers
(``npd.teacher.url``), through vLLM's completions API or SGLang's generate API
(``npd.teacher.api``; the wire formats are in :mod:`verl_npd.rollout.teacher_api`).

``HTTPTeacher.score`` has the interface of :class:`verl_npd.rollout.scoring.ServerPool`'s, so the
rollout manager scores with it as with a teacher replica. What it does with a call's sequences:

* **batches**: consecutive sequences go together into requests of at most
  ``npd.teacher.max_tokens_per_request`` tokens (a longer sequence goes alone), so a wave costs a
  few requests instead of one per sequence, and the server prefills each request's sequences
  together;
* **balance**: each request goes to the server with the fewest tokens outstanding (sent, not yet
  answered), at most ``npd.teacher.max_concurrency`` requests in flight per server;
* **failover**: a request that times out, finds no server or gets a 5xx/408/429 answer marks that
  server down and goes to another one; a down server is probed (its health endpoint, with backoff)
  and used again once it answers. Only when no server is up does a request wait, for at most
  ``npd.teacher.max_wait_s``, before the run fails naming every URL. Other HTTP errors and
  malformed answers fail at once naming the URL.

Each request's answer is used once, for exactly its sequences: a request that failed on one server
is sent whole to another, and ``score`` returns every sequence's scores or raises, so a wave is
never trained on half-scored.

A teacher's embedding matrix may be padded beyond its tokenizer (Qwen2.5-7B: 152,064 rows for
151,665 tokens; its student Qwen2.5-0.5B has 151,936), and a plain ``vllm serve`` scores those rows
too; verl's own vLLM server masks every id at or beyond the tokenizer's size
(``monkey_patch_compute_logits``, verl/workers/rollout/vllm_rollout/utils.py:106-131, called with
``len(tokenizer)`` at vllm_async_server.py:500-506). Such an id among the top k is kept as a
zero-probability entry (id 0, log-prob -inf) instead: the student's logits may have no row for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import msgspec

from verl_npd.rollout.scoring import PromptScores
from verl_npd.rollout.teacher_api import MAX_PROMPTS_PER_REQUEST, TEACHER_APIS, TeacherRequestError

logger = logging.getLogger("verl_npd")

# Answers worth asking again (elsewhere): the server is overloaded, restarting or timed out.
_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Health probes of a down server: the first after this long, then twice as long each time.
_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 30.0

class _Retryable(Exception):
    """A failure that may pass: the server is unreachable, restarting or overloaded."""


def token_batches(lengths: Sequence[int], max_tokens: int) -> list[range]:
    """Consecutive runs of sequences of at most ``max_tokens`` tokens in all (a longer sequence
    alone) and at most vLLM's default count of prompts per request."""
    batches: list[range] = []
    start, tokens = 0, 0
    for i, length in enumerate(lengths):
        if i > start and (tokens + length > max_tokens or i - start >= MAX_PROMPTS_PER_REQUEST):
            batches.append(range(start, i))
            start, tokens = i, 0
        tokens += length
    if lengths:
        batches.append(range(start, len(lengths)))
    return batches


def mask_ids_beyond(scores: PromptScores, num_valid_tokens: int) -> PromptScores:
    """``scores`` with every top-k id at or beyond ``num_valid_tokens`` turned into a
    zero-probability entry (id 0, log-prob -inf); the actual tokens' log-probs are untouched."""
    beyond = scores.topk_ids >= num_valid_tokens
    return replace(
        scores,
        topk_ids=scores.topk_ids.masked_fill(beyond, 0),
        topk_log_probs=scores.topk_log_probs.masked_fill(beyond, float("-inf")),
    )


@dataclass
class TeacherServer:
    """One URL of ``npd.teacher.url`` as the dispatcher sees it."""

    url: str
    endpoint: str
    up: bool = True
    in_flight: int = 0
    outstanding_tokens: int = 0
    # Requests this server answered, the sequences they scored, and the attempts that failed on it.
    requests: int = 0
    scored: int = 0
    failures: int = 0
    last_error: str = ""


class _Deadline:
    """How long one request may still wait for a server, counted from its first failure or from
    when it first found no server up."""

    def __init__(self, max_wait_s: float):
        self.max_wait_s = max_wait_s
        self.since: float | None = None

    def start(self) -> None:
        if self.since is None:
            self.since = time.monotonic()

    def left(self) -> float:
        return self.max_wait_s if self.since is None else self.since + self.max_wait_s - time.monotonic()


class HTTPTeacher:
    """Prefill scoring on served teachers; ``score`` as :meth:`ServerPool.score` (module docstring).

    Args:
        urls: the servers (vLLM: the API base, e.g. ``http://host:8000/v1``; SGLang: the server,
            e.g. ``http://host:30000``), all serving the same teacher.
        api: ``"vllm"`` or ``"sglang"``.
        model: the served model's name (vLLM's request ``model``); None lets vLLM pick its only one.
        api_key: sent as ``Authorization: Bearer``; None sends none.
        max_concurrency: requests in flight at once per server.
        max_tokens_per_request: tokens (prompt ids) per request.
        timeout_s: per request, before it counts as failed on that server.
        max_wait_s: how long a request waits while no server is up before the run fails.
        probe_timeout_s: per health probe of a down server.
        num_valid_tokens: the tokenizer's size: larger top-k ids are masked (module docstring);
            None keeps every id.
    """

    def __init__(
        self,
        urls: Sequence[str],
        api: str,
        model: str | None,
        api_key: str | None,
        max_concurrency: int,
        max_tokens_per_request: int,
        timeout_s: float,
        max_wait_s: float,
        probe_timeout_s: float,
        num_valid_tokens: int | None = None,
    ):
        self.api = TEACHER_APIS[api]
        self.servers = [
            TeacherServer(url=u.rstrip("/"), endpoint=u.rstrip("/") + self.api.scoring_path) for u in urls
        ]
        if not self.servers:
            raise ValueError("no teacher URL to score on")
        self.model = model
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.max_concurrency = max_concurrency
        self.max_tokens_per_request = max_tokens_per_request
        self.timeout_s = timeout_s
        self.max_wait_s = max_wait_s
        self.probe_timeout_s = probe_timeout_s
        self.num_valid_tokens = num_valid_tokens
        self.retries = 0  # requests that failed on a server and were sent again
        # The dispatcher's state belongs to one event loop (the rollout manager runs its own, each
        # test its own): an asyncio Condition and the probe tasks cannot cross loops.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Condition | None = None
        self._probes: set[asyncio.Task] = set()

    async def score(self, sequences: Sequence[Sequence[int]], num_logprobs: int) -> list[PromptScores]:
        """Prefill every sequence on the teacher servers; its scores, in order. Raises
        :class:`TeacherRequestError` if any sequence cannot be scored."""
        import aiohttp

        self._bind_loop()
        batches = token_batches([len(s) for s in sequences], self.max_tokens_per_request)
        # A session per call (its requests on kept-alive connections): it never outlives the event
        # loop it was made in. No connection limit: the dispatcher bounds requests per server.
        async with aiohttp.ClientSession(
            headers=self.headers,
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            connector=aiohttp.TCPConnector(limit=0),
        ) as session:
            answers = await asyncio.gather(
                *[self._score_batch(session, [sequences[i] for i in batch], num_logprobs) for batch in batches]
            )
        return [scores for answer in answers for scores in answer]

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        self._loop, self._changed, self._probes = loop, asyncio.Condition(), set()
        for server in self.servers:
            server.up, server.in_flight, server.outstanding_tokens = True, 0, 0

    async def _score_batch(self, session, sequences: list[Sequence[int]], num_logprobs: int) -> list[PromptScores]:
        tokens = sum(len(s) for s in sequences)
        body = msgspec.json.encode(self.api.request(self.model, sequences, num_logprobs))
        deadline = _Deadline(self.max_wait_s)
        while True:
            server = await self._acquire(tokens, deadline)
            try:
                answer = await self._post(session, server, body)
            except _Retryable as e:
                await self._failed(server, e, len(sequences), deadline)
                continue
            finally:
                await self._release(server, tokens)
            scores = self.api.parse(answer, sequences, num_logprobs, server.endpoint)
            if self.num_valid_tokens is not None:
                scores = [mask_ids_beyond(s, self.num_valid_tokens) for s in scores]
            server.requests += 1
            server.scored += len(sequences)
            return scores

    async def _acquire(self, tokens: int, deadline: _Deadline) -> TeacherServer:
        """The up server with the fewest outstanding tokens that has a free slot; waits for one."""
        async with self._changed:
            while True:
                free = [s for s in self.servers if s.up and s.in_flight < self.max_concurrency]
                if free:
                    server = min(free, key=lambda s: (s.outstanding_tokens, s.in_flight))
                    server.in_flight += 1
                    server.outstanding_tokens += tokens
                    return server
                if any(s.up for s in self.servers):
                    await self._changed.wait()  # every up server is busy
                    continue
                deadline.start()
                left = deadline.left()
                if left <= 0:
                    raise TeacherRequestError(
                        f"no teacher server answered for {self.max_wait_s:.0f}s (npd.teacher.max_wait_s): "
                        + "; ".join(f"{s.endpoint}: {s.last_error}" for s in self.servers)
                    )
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except (asyncio.TimeoutError, TimeoutError):
                    pass

    async def _release(self, server: TeacherServer, tokens: int) -> None:
        async with self._changed:
            server.in_flight -= 1
            server.outstanding_tokens -= tokens
            self._changed.notify_all()

    async def _failed(self, server: TeacherServer, error: _Retryable, n: int, deadline: _Deadline) -> None:
        """Mark ``server`` down (a probe brings it back) and count the request's retry."""
        deadline.start()
        self.retries += 1
        server.failures += 1
        server.last_error = str(error)
        others = [s.url for s in self.servers if s.up and s is not server]
        logger.warning(
            "verl-npd: teacher server %s failed: %s; %d sequence(s) sent %s",
            server.endpoint, error, n,
            f"to {others[0]}" if len(others) == 1 else "to another server" if others else
            f"again once a server answers (giving up in {max(deadline.left(), 0):.0f}s)",
        )  # fmt: skip
        async with self._changed:
            if server.up:
                server.up = False
                probe = asyncio.create_task(self._probe(server))
                self._probes.add(probe)
                probe.add_done_callback(self._probes.discard)
            self._changed.notify_all()

    async def _probe(self, server: TeacherServer) -> None:
        """Ask a down server's health endpoint, with backoff, until it answers; then it is up."""
        import aiohttp

        backoff = _FIRST_BACKOFF_S
        async with aiohttp.ClientSession(
            headers=self.headers, timeout=aiohttp.ClientTimeout(total=self.probe_timeout_s)
        ) as session:
            while True:
                await asyncio.sleep(backoff)
                try:
                    async with session.get(server.url + self.api.health_path) as response:
                        if response.status == 200:
                            break
                except (aiohttp.ClientError, asyncio.TimeoutError, TimeoutError):
                    pass
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
        async with self._changed:
            server.up = True
            self._changed.notify_all()
        logger.warning("verl-npd: teacher server %s answers again; scoring there resumes", server.url)

    async def _post(self, session, server: TeacherServer, body: bytes) -> Any:
        import aiohttp

        try:
            async with session.post(server.endpoint, data=body) as response:
                raw = await response.read()
                status = response.status
        except (asyncio.TimeoutError, TimeoutError):
            raise _Retryable(f"no answer within {self.timeout_s:.0f}s (npd.generation.request_timeout_s)") from None
        except aiohttp.ClientError as e:
            raise _Retryable(f"{type(e).__name__}: {e}") from None
        text = raw[:500].decode(errors="replace")
        if status in _RETRYABLE_STATUS:
            raise _Retryable(f"HTTP {status}: {text[:200]}")
        if status != 200:
            raise TeacherRequestError(f"the teacher at {server.endpoint} answered HTTP {status}: {text}")
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError:
            raise TeacherRequestError(f"malformed answer from {server.endpoint}: not JSON: {text[:200]!r}") from None


def teacher_api_key(api_key_env: str | None) -> str | None:
    """The key in the environment variable ``npd.teacher.api_key_env`` names; a clear error if unset."""
    if api_key_env is None:
        return None
    key = os.environ.get(api_key_env)
    if not key:
        raise ValueError(f"npd.teacher.api_key_env={api_key_env!r} but that environment variable is not set")
    return key

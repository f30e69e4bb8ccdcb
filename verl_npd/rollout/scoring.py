"""Requests straight to the servers: the student's generation, and prefill scoring (the teacher's
top-k targets with the log-prob of every actual token, the unconditional Δ-IFD prefills) for a
whole wave at a time.

Why not verl's ``LLMServerClient``: it routes every request through verl's global load balancer
(an acquire and a release, two more Ray calls per request), which is there for sticky multi-turn
sessions. NPD's requests are single-turn, so ``ServerPool`` spreads them over the server actors
itself and calls them directly. Generation is one ``generate`` call per sample. Prefills go:

* ``batched=True`` (``npd_cpu``): one ``score_prompts`` call per server carries its whole share of
  the wave, and the server prefills it as one batch;
* ``batched=False`` (vLLM, SGLang): one ``generate`` call per sequence with ``prompt_logprobs``,
  sent straight to a server (vLLM batches concurrent requests itself).

Both return the same numbers (tested). One prefill gives the top-k and the actual tokens'
log-probs, as vLLM's ``prompt_logprobs`` does: a teacher scores each sample once.

A server whose process dies (Ray's ``ActorDiedError``; verl's replicas are never restarted) is taken
out of its pool, and what it had in flight goes to the others; the run ends only when none is left.

A teacher served outside the job (``npd.teacher.url``) scores through
:class:`verl_npd.rollout.remote_teacher.HTTPTeacher`, which has the same ``score``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.exceptions import ActorDiedError

from verl_npd.engines.prompt_logprobs import PROMPT_TOKEN_LOGPROBS, scoring_params

logger = logging.getLogger("verl_npd")

_ABORTED = ("aborted", "abort")


class RequestFailed(RuntimeError):
    """A rollout or teacher request failed or timed out after every retry."""


async def call_with_retries(make_call: Callable, what: str, timeout_s: float, max_retries: int):
    """Run ``make_call()`` with a timeout, retrying a bounded number of times; never hangs. A dead
    server is not retried: it will not answer again, and the caller moves the work (``ServerPool``);
    nor is a ``RequestFailed`` from inside (every server has died: nothing is left to retry on)."""
    last_error: BaseException | None = None
    for attempt in range(max_retries + 1):
        try:
            return await asyncio.wait_for(make_call(), timeout=timeout_s)
        except (ActorDiedError, RequestFailed):
            raise
        except (asyncio.TimeoutError, TimeoutError) as e:
            last_error = e
            logger.warning(
                "verl-npd: %s timed out after %.0fs (attempt %d/%d)", what, timeout_s, attempt + 1, max_retries + 1
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:
            last_error = e
            logger.warning("verl-npd: %s failed (attempt %d/%d): %r", what, attempt + 1, max_retries + 1, e)
    raise RequestFailed(f"{what} failed after {max_retries + 1} attempts: {last_error!r}") from last_error


@dataclass
class PromptScores:
    """The prefill of one sequence of S tokens, in verl's vLLM layout: entry t scores token t+1, and
    the last of the S entries is padding."""

    topk_ids: torch.Tensor  # [S, max(k, 1)] int32
    topk_log_probs: torch.Tensor  # [S, max(k, 1)] float32
    token_log_probs: list[float]  # S - 1 entries: log p(token t+1 | tokens <= t)

    @classmethod
    def from_extra_fields(cls, extra_fields: dict[str, Any], num_tokens: int) -> PromptScores:
        ids = torch.tensor(extra_fields["prompt_ids"], dtype=torch.int32)
        log_probs = torch.tensor(extra_fields["prompt_logprobs"], dtype=torch.float32)
        token_log_probs = extra_fields.get(PROMPT_TOKEN_LOGPROBS)
        if token_log_probs is None:
            raise RuntimeError(
                f"the server returned no {PROMPT_TOKEN_LOGPROBS!r} next to its prompt log-probs; NPD needs a "
                "backend that reports the actual tokens' log-probs (npd_cpu, or verl's vLLM server with "
                "verl-npd's patch)"
            )
        if not ids.shape[0] == log_probs.shape[0] == len(token_log_probs) == num_tokens:
            raise RuntimeError(
                f"prompt log-probs of {ids.shape[0]}/{log_probs.shape[0]}/{len(token_log_probs)} entries for a "
                f"sequence of {num_tokens} tokens"
            )
        return cls(topk_ids=ids, topk_log_probs=log_probs, token_log_probs=[float(x) for x in token_log_probs[:-1]])


class ServerPool:
    """Prefill scoring on a fixed set of server actors, without a load balancer (module docstring).

    Args:
        handles: the servers' Ray actor handles (one per replica).
        name: what the servers are, for error messages ("teacher", "rollout").
        batched: the servers have ``score_prompts`` (``npd_cpu``); otherwise ``generate`` is used.
        timeout_s, max_retries: per call, as for every other request.
        labels: each server's name in messages and the summary (its replica); by default its index.
        on_dead: called with a server's handle when it is taken out of service (the trainer takes a
            standalone student replica out of verl's load balancer and weight syncs).
    """

    def __init__(
        self,
        handles: Sequence,
        name: str,
        batched: bool,
        timeout_s: float,
        max_retries: int,
        labels: Sequence[str] | None = None,
        on_dead: Callable[[Any], None] | None = None,
    ):
        if not handles:
            raise ValueError(f"no {name} servers to score on")
        self.handles = list(handles)
        self.labels = list(labels) if labels is not None else [f"{name} server {i}" for i in range(len(handles))]
        if len(self.labels) != len(self.handles):
            raise ValueError(f"{len(self.labels)} labels for {len(self.handles)} {name} servers")
        self.name = name
        self.batched = batched
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.on_dead = on_dead
        self.calls = 0
        # The servers taken out of service, by label, and the requests or sequences they had in
        # flight, sent again to the others.
        self.dead: list[str] = []
        self.moved = 0
        self._dead_ids: set[str] = set()
        self._next = 0
        # The manager's event loop spreads work while the trainer's thread may take a server out
        # (the liveness check before a weight sync).
        self._lock = threading.Lock()

    async def score(self, sequences: Sequence[Sequence[int]], num_logprobs: int) -> list[PromptScores]:
        """Prefill every sequence; its scores, in order. Sequences aborted by a weight sync to
        standalone replicas, or in flight on a server that died, are sent again."""
        results: list[PromptScores | None] = [None] * len(sequences)
        pending = list(range(len(sequences)))
        while pending:
            shares = self._spread(pending)
            answers = await asyncio.gather(
                *[self._score_share(handle, [sequences[i] for i in share], num_logprobs) for handle, share in shares]
            )
            for (_, share), answer in zip(shares, answers, strict=True):
                for i, scores in zip(share, answer, strict=True):
                    results[i] = scores
            pending = [i for i in pending if results[i] is None]
        return results

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any]):
        """One generation request, as verl's ``LLMServerClient.generate`` makes it, on the next server
        (the next one again if that one has died); its weight versions are reported the way verl's
        client reports them: the server's own ``min_global_steps``/``max_global_steps`` (the versions
        of the first and last tokens: npd_cpu, and verl's vLLM server with
        :mod:`verl_npd.engines.vllm_weight_versions`), else the one it answered with for both."""
        while True:
            with self._lock:
                self._raise_if_none_left()
                handle = self.handles[self._next % len(self.handles)]
                self._next = (self._next + 1) % len(self.handles)
            self.calls += 1
            try:
                output = await handle.generate.remote(
                    prompt_ids=prompt_ids, sampling_params=sampling_params, request_id=request_id
                )
                break
            except ActorDiedError as e:
                if not self.take_out(e, in_flight=1):
                    raise
        version = output.extra_fields.get("global_steps")
        output.extra_fields.setdefault("min_global_steps", version)
        output.extra_fields.setdefault("max_global_steps", version)
        return output

    def take_out(self, error: BaseException, in_flight: int) -> bool:
        """If ``error`` is the death of one of these servers, take it out of service (once) and count
        its ``in_flight`` work as moved; True if the dead server is one of these. Raises
        ``RequestFailed`` when none is left."""
        actor_id = error.actor_id if isinstance(error, ActorDiedError) else None
        if actor_id is None:
            return False
        with self._lock:
            ids = [handle._actor_id.hex() for handle in self.handles]
            handle = None
            if actor_id in ids:
                index = ids.index(actor_id)
                handle = self.handles.pop(index)
                self.dead.append(self.labels.pop(index))
                self._dead_ids.add(actor_id)
                self._next = self._next % len(self.handles) if self.handles else 0
            elif actor_id not in self._dead_ids:
                return False
            self.moved += in_flight
            left = len(self.handles)
        if handle is not None:
            logger.warning(
                "verl-npd: %s died; it is out of service and its work goes to the %d left", self.dead[-1], left
            )
            if self.on_dead is not None:
                self.on_dead(handle)
        if not left:
            raise self._none_left() from error
        return True

    def _none_left(self) -> RequestFailed:
        return RequestFailed(f"every {self.name} server has died ({', '.join(self.dead)})")

    def _raise_if_none_left(self) -> None:
        """Called under the lock: a request that starts after another one (or the trainer's liveness
        check) took the last server out fails with the same error that one got."""
        if not self.handles:
            raise self._none_left()

    def check_alive(self, timeout_s: float) -> None:
        """Ask every server whether it is alive, and take out those that have died (called from the
        trainer's thread before a weight sync: a server that died with nothing in flight would
        otherwise fail the sync). A server that does not answer within ``timeout_s`` is busy, not dead."""
        with self._lock:
            self._raise_if_none_left()
            handles = list(self.handles)
        answered, _ = ray.wait([h.__ray_ready__.remote() for h in handles], num_returns=len(handles), timeout=timeout_s)
        for ready in answered:
            try:
                ray.get(ready)
            except ActorDiedError as e:
                self.take_out(e, in_flight=0)

    def _spread(self, indices: list[int]) -> list[tuple[Any, list[int]]]:
        """Deal ``indices`` round-robin over the servers, continuing where the last call stopped,
        so small waves do not all land on the first server."""
        with self._lock:
            self._raise_if_none_left()
            handles = list(self.handles)
            shares: list[list[int]] = [[] for _ in handles]
            for i in indices:
                self._next %= len(handles)
                shares[self._next].append(i)
                self._next += 1
        return [(handle, share) for handle, share in zip(handles, shares, strict=True) if share]

    async def _score_share(self, handle, sequences: list[Sequence[int]], num_logprobs: int):
        """A server's share of the sequences; ``None`` for each one it did not score (aborted by a
        weight sync, or the server died: then it is taken out, and ``score`` sends them again)."""
        what = f"{self.name} scoring of {len(sequences)} sequence(s)"
        if not self.batched:
            return await asyncio.gather(*[self._score_one(handle, s, num_logprobs, what) for s in sequences])
        self.calls += 1
        try:
            answers = await call_with_retries(
                lambda: handle.score_prompts.remote([list(s) for s in sequences], num_logprobs),
                what,
                self.timeout_s,
                self.max_retries,
            )
        except ActorDiedError as e:
            if not self.take_out(e, in_flight=len(sequences)):
                raise
            return [None] * len(sequences)
        return [None if a is None else PromptScores.from_extra_fields(a, len(s)) for a, s in zip(answers, sequences)]

    async def _score_one(self, handle, sequence: Sequence[int], num_logprobs: int, what: str) -> PromptScores | None:
        self.calls += 1
        try:
            output = await call_with_retries(
                lambda: handle.generate.remote(
                    prompt_ids=list(sequence), sampling_params=scoring_params(num_logprobs), request_id=uuid.uuid4().hex
                ),
                what,
                self.timeout_s,
                self.max_retries,
            )
        except ActorDiedError as e:
            if not self.take_out(e, in_flight=1):
                raise
            return None
        if output.stop_reason in _ABORTED:
            return None
        return PromptScores.from_extra_fields(output.extra_fields, len(sequence))

"""The asynchronous rollout manager: generates from a slightly stale student while the trainer
trains, scores every finished sample with the teacher, filters by Δ-IFD and feeds the buffer.

It runs its own asyncio loop in a background thread of the trainer's driver process, so the same
code drives the CPU backend, vLLM or SGLang, on one machine or many.

Samples are processed in waves of one training batch's worth of prompts, plus as many as the filter
is expected to drop (fewer when the buffer grants fewer: only as many as will still be fresh for the
trainer); a wave is the Δ-IFD filter's scoring window, and several waves are in flight at once
(they enter the buffer in the order they started).
Per wave, all on the servers:
1. the student's rollout replicas sample every response y with its per-token log-probs
   (log p_B(y_i | x, y_<i)), one request per sample, straight to a server;
2. then, at once and straight to the servers (:mod:`verl_npd.rollout.scoring`): the teacher
   prefills every x+y once, which gives both the distillation targets (top-k log-probs per
   position) and the actual tokens' log-probs (s_T(y|x)); the teacher and the student each
   prefill header+y (the assistant header without the user turn) for the unconditional terms
   s_T(y) and s_B(y).

Every sample is tagged with the oldest weights that produced any of its tokens (verl's
``min_global_steps``), and counts as spanning a sync when its newest differ (``max_global_steps``).
A weight sync to standalone rollout replicas (their own GPUs, a checkpoint engine) aborts the
requests they are running. Generation then goes through ``student_generation_client``, verl's
``FullyAsyncLLMServerClient``, which resumes an aborted response from its tokens so far and reports
the oldest and newest versions of its parts; prefills are simply sent again. Colocated replicas are
synced between two engine steps and abort nothing: a request running then continues on the new
weights, its KV cache holding both, and the server reports the versions (``npd_cpu`` exactly, per
engine step; verl's vLLM server as :mod:`verl_npd.engines.vllm_weight_versions` patches it); both
clients are then the same plain one.

A replica whose server dies is taken out of service (``ServerPool.take_out``: the trainer also takes
it out of verl's load balancer and weight syncs), and what it had in flight starts again on the
others: a response from its prompt and seed, a prefill as it was.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ray.exceptions import ActorDiedError

from verl_npd.filters.ifd import ifd_from_nll, mean_token_nll
from verl_npd.rollout.buffer import BufferClosed, NearPolicyBuffer, Sample
from verl_npd.rollout.cross_tokenizer import CrossTokenizer
from verl_npd.rollout.scoring import ServerPool, call_with_retries

logger = logging.getLogger("verl_npd")


class PromptStream:
    """A deterministic, resumable stream of dataset indices: epoch e visits a permutation seeded by
    (seed, e). Prompts that were in flight at a checkpoint are re-issued first after a resume.

    It also holds the positions the filter dropped that the trainer has not yet recorded
    (``positions.jsonl``): a checkpoint carries them, so that the record stays exact across a resume.
    """

    def __init__(self, dataset_size: int, seed: int, shuffle: bool = True):
        if dataset_size < 1:
            raise ValueError("the training dataset is empty")
        self.dataset_size = dataset_size
        self.seed = seed
        self.shuffle = shuffle
        self.cursor = 0
        self.reissue: list[int] = []
        self.filtered: list[int] = []
        self._permutations: dict[int, np.ndarray] = {}

    def dataset_index(self, position: int) -> int:
        epoch, offset = divmod(position, self.dataset_size)
        if not self.shuffle:
            return offset
        if epoch not in self._permutations:
            self._permutations = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.dataset_size)}
        return int(self._permutations[epoch][offset])

    def take(self, n: int) -> list[int]:
        """The next ``n`` stream positions."""
        positions = self.reissue[:n]
        self.reissue = self.reissue[n:]
        while len(positions) < n:
            positions.append(self.cursor)
            self.cursor += 1
        return positions

    def state_dict(self, in_flight: Sequence[int]) -> dict[str, Any]:
        return {
            "cursor": self.cursor,
            "reissue": sorted(set(self.reissue) | set(in_flight)),
            "filtered": list(self.filtered),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state["cursor"])
        self.reissue = [int(p) for p in state["reissue"]]
        self.filtered = [int(p) for p in state["filtered"]]


@dataclass
class PromptItem:
    position: int
    prompt_ids: list[int]
    routing_key: str | None
    extra: dict[str, Any]
    # The chat messages the prompt was rendered from: a teacher with a tokenizer of its own renders
    # them with its chat template (npd.cross_tokenizer). Needed only until the sample is scored, so
    # checkpoints do not keep them.
    messages: list[dict[str, Any]] | None = None


@dataclass
class Rollout:
    """One response as the student's rollout replica returned it."""

    prompt: PromptItem
    response_ids: list[int]
    log_probs: list[float]  # log p_B(y_i | x, y_<i)
    version: int
    # Generation was aborted by a weight sync and resumed on the new weights (standalone rollout).
    spans_sync: bool


@dataclass
class GeneratedSample:
    """Everything the trainer and the filter need about one response."""

    prompt: PromptItem
    response_ids: list[int]
    rollout_log_probs: list[float]
    version: int
    teacher_topk_ids: torch.Tensor  # [S, k] int32, vLLM layout (entry t scores token t + 1)
    teacher_topk_log_probs: torch.Tensor  # [S, k]
    teacher_cond: list[float]  # log p_T(y_i | x, y_<i)
    teacher_uncond: list[float]  # log p_T(y_i | header, y_<i)
    behaviour_uncond: list[float]  # log p_B(y_i | header, y_<i)
    spans_sync: bool = False
    # Across tokenizers (npd.cross_tokenizer): [S] int32, the student tokens each row's target covers
    # (verl_npd.rollout.cross_tokenizer); teacher_cond and teacher_uncond are then over the teacher's
    # own tokens of the response. None: the teacher scored the student's tokens.
    teacher_span: torch.Tensor | None = None


class AsyncRolloutManager:
    """Keeps generating while the trainer trains; see the module docstring."""

    def __init__(
        self,
        *,
        student_generation_client,
        student_scorer: ServerPool,
        teacher_scorers: dict[str, ServerPool],
        teacher_topk: int,
        buffer: NearPolicyBuffer,
        sample_filter,
        prompt_fn: Callable[[int], PromptItem],
        stream: PromptStream,
        header_ids: Sequence[int],
        samples_per_prompt: int,
        sampling_params: dict[str, Any],
        max_wave_prompts: int,
        max_waves_in_flight: int,
        request_timeout_s: float,
        max_retries: int,
        seed: int,
        cross_tokenizers: dict[str, CrossTokenizer] | None = None,
    ):
        """``cross_tokenizers``: per teacher key, how that teacher reads the student's samples in its
        own tokens (``npd.cross_tokenizer``); a teacher without one is fed the student's ids."""
        self.student_generation_client = student_generation_client
        self.student_scorer = student_scorer
        self.teacher_scorers = teacher_scorers
        self.teacher_topk = teacher_topk
        self.buffer = buffer
        self.sample_filter = sample_filter
        self.prompt_fn = prompt_fn
        self.stream = stream
        self.header_ids = list(header_ids)
        self.samples_per_prompt = samples_per_prompt
        self.sampling_params = dict(sampling_params)
        self.max_wave_prompts = max_wave_prompts
        self.max_waves_in_flight = max_waves_in_flight
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.seed = seed
        self.cross_tokenizers = dict(cross_tokenizers or {})
        if self.cross_tokenizers and set(self.cross_tokenizers) != set(teacher_scorers):
            raise ValueError(
                f"cross-tokenizer views for teachers {sorted(self.cross_tokenizers)}, but the teachers are "
                f"{sorted(teacher_scorers)}: each one needs its own"
            )

        self._lock = threading.Lock()
        self._in_flight_positions: set[int] = set()
        self._metrics: list[dict[str, float]] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        # Cleared by pause(): no new wave starts until resume().
        self._running = threading.Event()
        self._running.set()
        self.error: BaseException | None = None

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._thread_main, name="npd-rollout", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop generating; in-flight prompts are abandoned (they are re-issued after a resume)."""
        self._stopping = True
        self.buffer.close()
        self._running.set()  # a paused generator would wait in its thread forever
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(self._loop)])
            except RuntimeError:  # the loop already ended: closing the buffer (a stop, a failure) ends it
                pass
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def pause(self) -> None:
        """Start no new wave and return once the waves in flight are done (or the manager has
        ended). The trainer pauses generation while it validates, so that no sample is made on
        the clock of the validation."""
        self._running.clear()
        while self._thread is not None and self._thread.is_alive():
            with self._lock:
                if not self._in_flight_positions:
                    return
            time.sleep(0.01)

    def resume(self) -> None:
        self._running.set()

    def _thread_main(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._generate_forever())
        except (asyncio.CancelledError, BufferClosed):
            pass
        except BaseException as e:
            self._fail(e)
        finally:
            self._loop.close()

    def _fail(self, error: BaseException) -> None:
        """Report a failure to the trainer at once: closing the buffer wakes a trainer waiting for
        samples and this thread waiting for room (either could otherwise wait forever)."""
        if self.error is None:
            self.error = error
            logger.error("verl-npd: the rollout manager failed: %r", error)
        self.buffer.close(error)

    def wave_prompts(self) -> int:
        """Prompts in the next wave: enough to fill a training batch after the filter (at the
        fraction it has kept so far), at most ``max_wave_prompts``. One wave per batch keeps
        waves full: a small remainder wave costs several times more per sample."""
        samples = self.buffer.batch_size / self.buffer.keep_fraction()
        return max(1, min(math.ceil(samples / self.samples_per_prompt - 1e-9), self.max_wave_prompts))

    async def _generate_forever(self) -> None:
        waves = asyncio.Semaphore(self.max_waves_in_flight)
        previous: asyncio.Task | None = None
        while not self._stopping:
            await waves.acquire()
            wanted = min(self.wave_prompts() * self.samples_per_prompt, self.buffer.capacity)
            try:
                # Fewer than a full wave when only that many would still be fresh for the trainer.
                version, granted = await asyncio.to_thread(self.buffer.acquire, wanted, None, self.samples_per_prompt)
            except BaseException:
                waves.release()
                raise
            # A pause that came while the buffer was granting holds the wave until resume().
            await asyncio.to_thread(self._running.wait)
            with self._lock:
                positions = self.stream.take(granted // self.samples_per_prompt)
                self._in_flight_positions.update(positions)
            task = asyncio.create_task(self._run_wave(positions, version, granted, after=previous))
            previous = task

            def on_done(t: asyncio.Task) -> None:
                waves.release()
                if not t.cancelled() and t.exception() is not None and not self._stopping:
                    self._fail(t.exception())

            task.add_done_callback(on_done)

    # ---- one wave ------------------------------------------------------------------------------

    async def _run_wave(
        self, positions: list[int], version: int, reserved: int, after: asyncio.Task | None = None
    ) -> None:
        """Generate, score and filter a wave, then store it once the wave ``after`` is stored: waves
        enter the buffer in the order they started, not the order they finish, so which samples a
        step trains on does not depend on which of two concurrent waves was faster."""
        start = time.monotonic()
        prompts = [self.prompt_fn(p) for p in positions]
        rollouts = await asyncio.gather(
            *[self._generate(prompt, j, version) for prompt in prompts for j in range(self.samples_per_prompt)]
        )
        generated_at = time.monotonic()
        check_finite_log_probs(rollouts)
        generated, teacher_s, score_metrics = await self._score(rollouts)
        decision = self._filter(generated)
        keep = decision.keep.tolist()
        kept = [Sample(uid=uuid.uuid4().hex, version=g.version, payload=g) for g, k in zip(generated, keep) if k]
        if after is not None:
            await asyncio.wait([after])
        with self._lock:  # atomic with respect to checkpoint_state(): stored, or still in flight
            self.buffer.put(kept, reserved=reserved, filtered=len(generated) - len(kept))
            self._in_flight_positions.difference_update(positions)
            self.stream.filtered.extend(g.prompt.position for g, k in zip(generated, keep) if not k)
            metrics = dict(decision.metrics)
            metrics["timing/wave"] = time.monotonic() - start
            # The wave's generation and its teacher scoring, first request to last answer.
            metrics["timing/gen"] = generated_at - start
            metrics["timing/teacher"] = teacher_s
            metrics["npd/wave_prompts"] = float(len(positions))
            metrics["npd/response_length_mean"] = float(np.mean([len(g.response_ids) for g in generated]))
            metrics["npd/spans_sync_fraction"] = float(np.mean([g.spans_sync for g in generated]))
            metrics.update(score_metrics)
            self._metrics.append(metrics)

    def _filter(self, generated: list[GeneratedSample]):
        def scores(cond: list[list[float]], uncond: list[list[float]]):
            return ifd_from_nll(_nll(cond), _nll(uncond))

        teacher = scores([g.teacher_cond for g in generated], [g.teacher_uncond for g in generated])
        behaviour = scores([g.rollout_log_probs for g in generated], [g.behaviour_uncond for g in generated])
        if not self.cross_tokenizers:
            return self.sample_filter(teacher=teacher, behaviour=behaviour)
        # A teacher's IFD over its own tokens (docs/algorithm.md, "Across tokenizers"); the sample's
        # length is the student's.
        return self.sample_filter(teacher=teacher, behaviour=behaviour, num_tokens=behaviour.num_tokens)

    def sampling_seed(self, position: int, sample_index: int) -> int:
        """Each sample draws from its own seeded generator (vLLM's per-request ``seed``), so what
        it samples does not depend on which requests share its batch: a prompt re-issued after a
        resume gets the same response from the same weights."""
        return int(np.random.SeedSequence([self.seed, position, sample_index]).generate_state(1)[0] & 0x7FFFFFFF)

    async def _generate(self, prompt: PromptItem, sample_index: int, version: int) -> Rollout:
        params = dict(self.sampling_params, logprobs=True, seed=self.sampling_seed(prompt.position, sample_index))
        while True:
            try:
                output = await call_with_retries(
                    lambda: self.student_generation_client.generate(
                        uuid.uuid4().hex, prompt_ids=prompt.prompt_ids, sampling_params=dict(params)
                    ),
                    f"rollout request for prompt #{prompt.position}",
                    self.request_timeout_s,
                    self.max_retries,
                )
                break
            except ActorDiedError as e:
                # A replica died under it (verl's client routes standalone requests itself): out of
                # service, and the request starts again on another, with the same seed.
                if not self.student_scorer.take_out(e, in_flight=1):
                    raise
        behaviour, spans_sync = behaviour_version(output.extra_fields, version)
        return Rollout(
            prompt=prompt,
            response_ids=list(output.token_ids),
            log_probs=[float(x) for x in (output.log_probs or [])],
            version=behaviour,
            spans_sync=spans_sync,
        )

    async def _score(self, rollouts: list[Rollout]) -> tuple[list[GeneratedSample], float, dict[str, float]]:
        """Score a wave: the teacher's prefill of every prompt+response (top-k and actual tokens) and
        the unconditional prefills of teacher and student, all concurrently. Returns the samples,
        the teacher's share of the time (its slowest call) and metrics of the scoring.

        A teacher with a tokenizer of its own (``cross_tokenizers``) prefills the sample in its own
        tokens (its chat template, its header), and its top-k is projected onto the student's rows."""
        unconditional = [self.header_ids + r.response_ids for r in rollouts]
        by_teacher: dict[str, list[int]] = {}
        for i, r in enumerate(rollouts):
            by_teacher.setdefault(self._teacher_key(r.prompt.routing_key), []).append(i)

        async def teacher_scores(key: str, indices: list[int]):
            started = time.monotonic()
            scorer = self.teacher_scorers[key]
            cross = self.cross_tokenizers.get(key)
            if cross is None:
                views = None
                conditional = [rollouts[i].prompt.prompt_ids + rollouts[i].response_ids for i in indices]
                header_only = [unconditional[i] for i in indices]
            else:
                views = await asyncio.to_thread(
                    lambda: [cross.teacher_sample(rollouts[i].prompt.messages, rollouts[i].response_ids)
                             for i in indices]  # fmt: skip
                )
                conditional = [v.prompt_ids + v.response_ids for v in views]
                header_only = [cross.teacher_header_ids + v.response_ids for v in views]
            cond, uncond = await asyncio.gather(
                scorer.score(conditional, self.teacher_topk), scorer.score(header_only, 0)
            )
            return cond, uncond, views, time.monotonic() - started

        behaviour_uncond, *per_teacher = await asyncio.gather(
            self.student_scorer.score(unconditional, 0),
            *[teacher_scores(key, indices) for key, indices in by_teacher.items()],
        )
        cond: list = [None] * len(rollouts)
        teacher_uncond: list = [None] * len(rollouts)
        views: list = [None] * len(rollouts)
        for (key, indices), (key_cond, key_uncond, key_views, _) in zip(by_teacher.items(), per_teacher, strict=True):
            for j, i in enumerate(indices):
                cond[i], teacher_uncond[i] = key_cond[j], key_uncond[j]
                if key_views is not None:
                    views[i] = (self.cross_tokenizers[key], key_views[j])
        # The teachers' top-k on the students' rows, off the event loop like the tokenization.
        projections = [None] * len(rollouts)
        if self.cross_tokenizers:
            projections = await asyncio.to_thread(
                lambda: [None if v is None else v[0].project(v[1], c, len(r.prompt.prompt_ids), len(r.response_ids))
                         for r, c, v in zip(rollouts, cond, views)]  # fmt: skip
            )
        n_header = len(self.header_ids)
        samples, span_fractions = [], []
        for r, c, u, b, view, projected in zip(
            rollouts, cond, teacher_uncond, behaviour_uncond, views, projections, strict=True
        ):
            n_prompt = len(r.prompt.prompt_ids)
            teacher_targets = {
                "teacher_topk_ids": c.topk_ids,
                "teacher_topk_log_probs": c.topk_log_probs,
                "teacher_cond": c.token_log_probs[n_prompt - 1 :],
                "teacher_uncond": u.token_log_probs[n_header - 1 :],
            }
            if view is not None:
                cross, teacher_sample = view
                teacher_targets = {
                    "teacher_topk_ids": projected.topk_ids,
                    "teacher_topk_log_probs": projected.topk_log_probs,
                    "teacher_span": projected.span,
                    # The teacher's IFD terms over its own tokens of the response.
                    "teacher_cond": c.token_log_probs[len(teacher_sample.prompt_ids) - 1 :],
                    "teacher_uncond": u.token_log_probs[len(cross.teacher_header_ids) - 1 :],
                }
                span_fractions.append(teacher_sample.span_token_fraction)
            samples.append(
                GeneratedSample(
                    prompt=r.prompt,
                    response_ids=r.response_ids,
                    rollout_log_probs=r.log_probs,
                    version=r.version,
                    spans_sync=r.spans_sync,
                    behaviour_uncond=b.token_log_probs[n_header - 1 :],
                    **teacher_targets,
                )
            )
        metrics = {}
        if span_fractions:
            metrics["npd/cross_tokenizer/span_token_fraction"] = float(np.mean(span_fractions))
        return samples, max(seconds for *_, seconds in per_teacher), metrics

    def _teacher_key(self, routing_key: str | None) -> str:
        if len(self.teacher_scorers) == 1:
            return next(iter(self.teacher_scorers))
        if routing_key not in self.teacher_scorers:
            raise ValueError(
                f"no teacher for routing key {routing_key!r} (distillation.teacher_key); "
                f"teachers: {sorted(self.teacher_scorers)}"
            )
        return routing_key

    # ---- what the trainer reads ----------------------------------------------------------------

    def drain_metrics(self) -> dict[str, float]:
        """Mean of each wave metric since the last call (waves finish at their own pace)."""
        with self._lock:
            waves, self._metrics = self._metrics, []
        if not waves:
            return {}
        keys = sorted({k for m in waves for k in m})
        return {k: float(np.mean([m[k] for m in waves if k in m])) for k in keys}

    def drain_filtered_positions(self) -> list[int]:
        """The stream positions of the samples the filter dropped since the last call."""
        with self._lock:
            positions, self.stream.filtered = self.stream.filtered, []
        return positions

    def servers_lost(self) -> list[dict[str, Any]]:
        """The servers that died during the run and were taken out, per pool, with how many
        requests or sequences they had in flight (sent again to the others)."""
        pools = [self.student_scorer, *self.teacher_scorers.values()]
        return [
            {"servers": pool.name, "dead": list(pool.dead), "moved": pool.moved}
            for pool in pools
            if isinstance(pool, ServerPool) and pool.dead
        ]

    def checkpoint_state(self) -> tuple[list[Sample], dict[str, Any], dict[str, Any]]:
        """The buffer's queued samples and accounting and the prompt stream, taken at one instant:
        a wave that finishes meanwhile is either in the snapshot or re-issued on resume, never
        both and never neither."""
        with self._lock:
            samples, buffer_state = self.buffer.snapshot()
            return samples, buffer_state, self.stream.state_dict(self._in_flight_positions)


def check_finite_log_probs(rollouts: list[Rollout]) -> None:
    """A rollout engine whose weights are not finite (a sync after an update that overflowed)
    reports NaN log-probs: every IFD is then NaN, the filter keeps nothing and the trainer would
    wait for samples forever. Ends the run instead, naming the weights that produced them."""
    for rollout in rollouts:
        if not all(math.isfinite(x) for x in rollout.log_probs):
            raise RuntimeError(
                f"the student's rollout returned non-finite log-probs for prompt #{rollout.prompt.position} "
                f"(weights of version {rollout.version}): the weights synced to it are not finite; see "
                "actor/grad_norm and actor/loss of the steps before"
            )


def behaviour_version(extra_fields: dict[str, Any], reserved: int) -> tuple[int, bool]:
    """A response's behaviour version, the oldest weights that produced any of its tokens, as its
    server or verl's client reports it (``min_global_steps``; a sync may land between the wave's
    reservation and the request), and whether a sync landed while it was generated
    (``max_global_steps`` differs). A backend that reports no version: the reservation's, no span."""
    oldest = extra_fields.get("min_global_steps")
    if oldest is None:
        return reserved, False
    return int(oldest), extra_fields.get("max_global_steps", oldest) != oldest


def _nll(rows: list[list[float]]):
    width = max((len(r) for r in rows), default=0)
    logprobs = torch.zeros(len(rows), width, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        logprobs[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
        mask[i, : len(row)] = True
    return mean_token_nll(logprobs, mask)

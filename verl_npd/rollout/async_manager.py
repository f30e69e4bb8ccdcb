"""The asynchronous rollout manager: generates from a slightly stale student while the trainer
trains, scores every finished sample with the teacher, filters by Δ-IFD and feeds the buffer.

It runs its own asyncio loop in a background thread of the trainer's driver process and talks to
verl's rollout replicas and teacher replicas through verl's load-balanced ``LLMServerClient``s,
so the same code drives the CPU backend, vLLM or SGLang, on one machine or many.

Per sample (a prompt x and one response y), all on the servers:
1. the student's rollout replica samples y with its per-token log-probs (log p_B(y_i | x, y_<i));
2. the teacher scores x+y: top-k log-probs per position (the distillation targets, through verl's
   teacher manager) and the log-prob of every actual token (s_T(y|x));
3. one prefill each of header+y (the assistant header without the user turn) on the teacher and
   the rollout replica give the unconditional terms s_T(y) and s_B(y).
Samples are processed in waves of up to ``wave_size`` prompts (fewer when the buffer grants fewer:
only as many as will still be fresh for the trainer); a wave is the Δ-IFD filter's scoring window,
and several waves are in flight at once.

A weight sync to standalone rollout replicas (their own GPUs, a checkpoint engine) aborts the
requests they are running. Generation then goes through ``student_generation_client``, verl's
``FullyAsyncLLMServerClient``, which resumes an aborted response from its tokens so far and reports
the oldest version that wrote it (the sample's tag, so staleness is never understated); prefills
are simply sent again. Colocated replicas are synced between engine steps and abort nothing, and
both clients are the same plain one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from verl_npd.filters.ifd import ifd_from_nll, mean_token_nll
from verl_npd.rollout.buffer import BufferClosed, NearPolicyBuffer, Sample

logger = logging.getLogger("verl_npd")


class PromptStream:
    """A deterministic, resumable stream of dataset indices: epoch e visits a permutation seeded by
    (seed, e). Prompts that were in flight at a checkpoint are re-issued first after a resume."""

    def __init__(self, dataset_size: int, seed: int, shuffle: bool = True):
        if dataset_size < 1:
            raise ValueError("the training dataset is empty")
        self.dataset_size = dataset_size
        self.seed = seed
        self.shuffle = shuffle
        self.cursor = 0
        self.reissue: list[int] = []
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
        return {"cursor": self.cursor, "reissue": sorted(set(self.reissue) | set(in_flight))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state["cursor"])
        self.reissue = [int(p) for p in state["reissue"]]


@dataclass
class PromptItem:
    position: int
    prompt_ids: list[int]
    routing_key: str | None
    extra: dict[str, Any]


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
    # Generation was aborted by a weight sync and resumed on the new weights (standalone rollout).
    spans_sync: bool = False
    timing: dict[str, float] = field(default_factory=dict)


class RequestFailed(RuntimeError):
    """A rollout or teacher request failed or timed out after every retry."""


async def call_with_retries(make_call: Callable, what: str, timeout_s: float, max_retries: int):
    """Run ``make_call()`` with a timeout, retrying a bounded number of times; never hangs."""
    last_error: BaseException | None = None
    for attempt in range(max_retries + 1):
        try:
            return await asyncio.wait_for(make_call(), timeout=timeout_s)
        except (asyncio.TimeoutError, TimeoutError) as e:
            last_error = e
            logger.warning("verl-npd: %s timed out after %.0fs (attempt %d/%d)", what, timeout_s, attempt + 1, max_retries + 1)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            last_error = e
            logger.warning("verl-npd: %s failed (attempt %d/%d): %r", what, attempt + 1, max_retries + 1, e)
    raise RequestFailed(f"{what} failed after {max_retries + 1} attempts: {last_error!r}") from last_error


def _actual_token_logprobs(extra_fields: dict) -> list[float]:
    """Entries of a ``prompt_logprobs=0`` answer: entry t is log p(token t+1); the last is padding."""
    return [float(row[0]) for row in extra_fields["prompt_logprobs"][:-1]]


class AsyncRolloutManager:
    """Keeps generating while the trainer trains; see the module docstring."""

    def __init__(
        self,
        *,
        student_client,
        student_generation_client,
        teacher_topk_scorer,
        teacher_clients: dict[str, Any],
        buffer: NearPolicyBuffer,
        sample_filter,
        prompt_fn: Callable[[int], PromptItem],
        stream: PromptStream,
        header_ids: Sequence[int],
        samples_per_prompt: int,
        sampling_params: dict[str, Any],
        wave_size: int,
        max_waves_in_flight: int,
        request_timeout_s: float,
        max_retries: int,
        seed: int,
    ):
        self.student_client = student_client
        self.student_generation_client = student_generation_client
        self.teacher_topk_scorer = teacher_topk_scorer
        self.teacher_clients = teacher_clients
        self.buffer = buffer
        self.sample_filter = sample_filter
        self.prompt_fn = prompt_fn
        self.stream = stream
        self.header_ids = list(header_ids)
        self.samples_per_prompt = samples_per_prompt
        self.sampling_params = dict(sampling_params)
        self.wave_size = wave_size
        self.max_waves_in_flight = max_waves_in_flight
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.seed = seed

        self._lock = threading.Lock()
        self._in_flight_positions: set[int] = set()
        self._metrics: list[dict[str, float]] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.error: BaseException | None = None

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._thread_main, name="npd-rollout", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop generating; in-flight prompts are abandoned (they are re-issued after a resume)."""
        self._stopping = True
        self.buffer.close()
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(self._loop)])
            except RuntimeError:  # the loop already ended: closing the buffer (a stop, a failure) ends it
                pass
        if self._thread is not None:
            self._thread.join(timeout=timeout)

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

    async def _generate_forever(self) -> None:
        waves = asyncio.Semaphore(self.max_waves_in_flight)
        wanted = self.wave_size * self.samples_per_prompt
        while not self._stopping:
            await waves.acquire()
            try:
                # Fewer than a full wave when only that many would still be fresh for the trainer.
                version, granted = await asyncio.to_thread(self.buffer.acquire, wanted, None, self.samples_per_prompt)
            except BaseException:
                waves.release()
                raise
            with self._lock:
                positions = self.stream.take(granted // self.samples_per_prompt)
                self._in_flight_positions.update(positions)
            task = asyncio.create_task(self._run_wave(positions, version, granted))

            def on_done(t: asyncio.Task) -> None:
                waves.release()
                if not t.cancelled() and t.exception() is not None and not self._stopping:
                    self._fail(t.exception())

            task.add_done_callback(on_done)

    # ---- one wave ------------------------------------------------------------------------------

    async def _run_wave(self, positions: list[int], version: int, reserved: int) -> None:
        start = time.monotonic()
        prompts = [self.prompt_fn(p) for p in positions]
        generated = await asyncio.gather(
            *[self._generate_sample(prompt, j, version) for prompt in prompts for j in range(self.samples_per_prompt)]
        )
        decision = self._filter(generated)
        kept = [
            Sample(uid=uuid.uuid4().hex, version=g.version, payload=g)
            for g, keep in zip(generated, decision.keep.tolist())
            if keep
        ]
        with self._lock:  # atomic with respect to checkpoint_state(): stored, or still in flight
            self.buffer.put(kept, reserved=reserved, filtered=len(generated) - len(kept))
            self._in_flight_positions.difference_update(positions)
            metrics = dict(decision.metrics)
            metrics["timing/wave"] = time.monotonic() - start
            for key in ("gen", "teacher"):
                metrics[f"timing/{key}_per_sample"] = float(np.mean([g.timing[key] for g in generated]))
            # The wave's teacher scoring, first request to last answer (samples are scored concurrently).
            metrics["timing/teacher"] = max(g.timing["teacher_end"] for g in generated) - min(
                g.timing["teacher_start"] for g in generated
            )
            metrics["npd/response_length_mean"] = float(np.mean([len(g.response_ids) for g in generated]))
            metrics["npd/spans_sync_fraction"] = float(np.mean([g.spans_sync for g in generated]))
            self._metrics.append(metrics)

    def _filter(self, generated: list[GeneratedSample]):
        def scores(cond: list[list[float]], uncond: list[list[float]]):
            return ifd_from_nll(_nll(cond), _nll(uncond))

        teacher = scores([g.teacher_cond for g in generated], [g.teacher_uncond for g in generated])
        behaviour = scores([g.rollout_log_probs for g in generated], [g.behaviour_uncond for g in generated])
        return self.sample_filter(teacher=teacher, behaviour=behaviour)

    def sampling_seed(self, position: int, sample_index: int) -> int:
        """Each sample draws from its own seeded generator (vLLM's per-request ``seed``), so what
        it samples does not depend on which requests share its batch: a prompt re-issued after a
        resume gets the same response from the same weights."""
        return int(np.random.SeedSequence([self.seed, position, sample_index]).generate_state(1)[0] & 0x7FFFFFFF)

    async def _generate_sample(self, prompt: PromptItem, sample_index: int, version: int) -> GeneratedSample:
        t0 = time.monotonic()
        output = await self._request(
            self.student_generation_client,
            prompt.prompt_ids,
            dict(self.sampling_params, logprobs=True, seed=self.sampling_seed(prompt.position, sample_index)),
            f"rollout request for prompt #{prompt.position}",
        )
        response_ids = list(output.token_ids)
        served_version = output.extra_fields.get("min_global_steps")
        t1 = time.monotonic()
        sequence = prompt.prompt_ids + response_ids
        teacher_client = self._teacher_client(prompt.routing_key)
        unconditional = self.header_ids + response_ids
        (topk_ids, topk_log_probs), teacher_full, teacher_uncond, behaviour_uncond = await asyncio.gather(
            call_with_retries(
                lambda: self.teacher_topk_scorer.compute_teacher_logprobs_single(
                    sequence, routing_key=prompt.routing_key
                ),
                f"teacher top-k scoring of prompt #{prompt.position}",
                self.request_timeout_s,
                self.max_retries,
            ),
            self._prefill(teacher_client, sequence, "teacher", prompt.position),
            self._prefill(teacher_client, unconditional, "teacher", prompt.position),
            self._prefill(self.student_client, unconditional, "rollout", prompt.position),
        )
        t2 = time.monotonic()
        n_prompt, n_header = len(prompt.prompt_ids), len(self.header_ids)
        return GeneratedSample(
            prompt=prompt,
            response_ids=response_ids,
            rollout_log_probs=[float(x) for x in (output.log_probs or [])],
            # The version the server reports having generated with (a sync may land between the
            # reservation and the request); backends that report none fall back to the reservation's.
            version=version if served_version is None else int(served_version),
            spans_sync=served_version is not None and output.extra_fields.get("max_global_steps") != served_version,
            teacher_topk_ids=topk_ids,
            teacher_topk_log_probs=topk_log_probs,
            teacher_cond=teacher_full[n_prompt - 1 :],
            teacher_uncond=teacher_uncond[n_header - 1 :],
            behaviour_uncond=behaviour_uncond[n_header - 1 :],
            timing={"gen": t1 - t0, "teacher": t2 - t1, "teacher_start": t1, "teacher_end": t2},
        )

    def _teacher_client(self, routing_key: str | None):
        if len(self.teacher_clients) == 1:
            return next(iter(self.teacher_clients.values()))
        return self.teacher_clients[routing_key]

    async def _request(self, client, prompt_ids: list[int], sampling_params: dict, what: str):
        return await call_with_retries(
            lambda: client.generate(uuid.uuid4().hex, prompt_ids=prompt_ids, sampling_params=dict(sampling_params)),
            what,
            self.request_timeout_s,
            self.max_retries,
        )

    async def _prefill(self, client, ids: list[int], who: str, position: int) -> list[float]:
        params = {"max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 0, "detokenize": False}
        while True:
            output = await self._request(client, ids, params, f"{who} prefill for prompt #{position}")
            # A weight sync to standalone replicas aborts what they are running; the prefill is
            # sent again and waits at the server until the sync is done.
            if output.stop_reason not in ("aborted", "abort"):
                return _actual_token_logprobs(output.extra_fields)

    # ---- what the trainer reads ----------------------------------------------------------------

    def drain_metrics(self) -> dict[str, float]:
        """Mean of each wave metric since the last call (waves finish at their own pace)."""
        with self._lock:
            waves, self._metrics = self._metrics, []
        if not waves:
            return {}
        keys = sorted({k for m in waves for k in m})
        return {k: float(np.mean([m[k] for m in waves if k in m])) for k in keys}

    def checkpoint_state(self) -> tuple[list[Sample], dict[str, Any], dict[str, Any]]:
        """The buffer's queued samples and accounting and the prompt stream, taken at one instant:
        a wave that finishes meanwhile is either in the snapshot or re-issued on resume, never
        both and never neither."""
        with self._lock:
            samples, buffer_state = self.buffer.snapshot()
            return samples, buffer_state, self.stream.state_dict(self._in_flight_positions)


def _nll(rows: list[list[float]]):
    width = max((len(r) for r in rows), default=0)
    logprobs = torch.zeros(len(rows), width, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        logprobs[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
        mask[i, : len(row)] = True
    return mean_token_nll(logprobs, mask)

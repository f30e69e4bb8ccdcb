"""``npd_cpu``: a rollout backend for verl 0.9.1 that runs a Hugging Face model on CPU.

verl 0.9.1 ships only vLLM, SGLang and TensorRT-LLM rollout servers, none of which runs on a
machine without an accelerator. This backend serves verl's agent loop and teacher loop through the
same token-in/token-out interface as ``vLLMHttpServer`` (verl/workers/rollout/vllm_rollout/
vllm_async_server.py), so verl's unmodified trainer runs on CPU with::

    actor_rollout_ref.rollout.name=npd_cpu
    distillation.teacher_models.teacher_model.inference.name=npd_cpu   # for a teacher

Pieces, mirroring verl's vLLM backend:

* :class:`CPURolloutServer` - the Ray actor (one per replica) holding the model and a
  continuous-batching engine (:mod:`verl_npd.engines.cpu_engine`); ``generate`` returns verl's
  ``TokenOutput``.
* :class:`CPURolloutReplica` - the ``RolloutReplica`` that places that actor next to its workers in
  hybrid, colocated and standalone modes.
* :class:`CPUServerAdapter` - the ``BaseRollout`` living in the trainer worker (hybrid mode) or in
  verl's ``CheckpointEngineWorker`` (colocated/standalone), which streams weights to the server.

Optional settings live under ``rollout.engine_kwargs.npd_cpu`` (e.g.
``+actor_rollout_ref.rollout.engine_kwargs.npd_cpu.num_threads=2``): ``num_threads``, the torch
threads of the server process (default: ``VERL_NPD_CPU_THREADS``, see
:mod:`verl_npd.platform.cpu_threads`; without it, the node's cores divided among the replicas).
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any, Optional

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import HFModelConfig, RolloutConfig
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, TokenOutput

from verl_npd.platform.cpu_threads import configured_threads
from verl_npd.engines.cpu_server_registration import ROLLOUT_NAME
from verl_npd.engines.prompt_logprobs import PROMPT_TOKEN_LOGPROBS, PROMPT_TOKEN_RANKS, scoring_params

if TYPE_CHECKING:
    from verl_npd.engines.cpu_engine import BatchedEngine, SamplingSpec, Sequence

logger = logging.getLogger(__name__)

# When the engine is idle, wait this long after the first arrival before prefilling, so that
# requests submitted together (an agent-loop batch) share one prefill instead of the first one
# running alone. Small next to any forward pass.
_IDLE_ADMISSION_WINDOW_S = 0.005

_ENGINE_KWARGS = frozenset({"num_threads"})


def _server_name(replica_rank: int, is_reward_model: bool, is_teacher_model: bool, name_suffix: str) -> str:
    """Ray actor name of a replica's server; the hybrid adapter finds it by this name (as vLLM's does)."""
    role = "reward_" if is_reward_model else "teacher_" if is_teacher_model else ""
    return f"{ROLLOUT_NAME}_server_{role}{replica_rank}_0{name_suffix}"


class CPURolloutServer:
    """Token-in/token-out generation server on CPU; wrapped with ``ray.remote`` by the replica.

    Behaves like ``vLLMHttpServer`` as verl drives it:

    * ``generate`` resolves ``max_tokens`` like vLLM's server, queues the request, and a background
      engine loop runs all queued and running requests as one batch per step (continuous batching),
      in a worker thread so the event loop keeps accepting requests;
    * ``abort_all_requests`` closes the admission gate and ends every in-flight request with
      ``stop_reason="aborted"`` and the tokens generated so far (verl's partial rollout resumes from
      them); requests arriving behind the closed gate wait for ``resume_generation``, or are
      answered "aborted" with no tokens when the abort passed ``reject_request=True``;
    * ``sleep`` (hybrid/colocated, with ``free_cache_engine``) waits for in-flight requests to
      finish and holds new ones until ``wake_up`` has restored both "weights" and "kv_cache";
      weights stay in memory, since host memory is what the trainer uses too and a CPU model is small;
    * ``update_weights`` loads HF-named tensors, the buckets of one sync together between two engine
      steps; every ``TokenOutput`` carries the weight version set by ``set_global_steps`` (or the
      sync) in ``extra_fields["global_steps"]``, and the versions of the weights that produced its
      first and last tokens as verl's ``min_global_steps``/``max_global_steps``: a weight sync that
      lands while a colocated replica generates (NPD never pauses it) changes the weights between two
      steps of a running request, whose KV cache then holds both versions, and the sample is tagged
      with the older (exact: each step records the version it computed with).

    Args:
        config: the rollout config (``RolloutConfig`` or its DictConfig).
        model_config: the model config (``HFModelConfig`` or its DictConfig).
        rollout_mode: how the replica was launched.
        replica_rank: rank of the replica; offsets the sampling seed.
        replicas_per_node: replicas sharing this node's cores, for the default thread count.
    """

    def __init__(
        self,
        config: RolloutConfig,
        model_config: HFModelConfig,
        rollout_mode: RolloutMode,
        replica_rank: int,
        replicas_per_node: int = 1,
    ) -> None:
        self.config: RolloutConfig = omega_conf_to_dataclass(config)
        self.model_config: HFModelConfig = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        self.rollout_mode = rollout_mode
        self.replica_rank = replica_rank
        self.global_steps: Optional[int] = None

        engine_kwargs = dict((self.config.engine_kwargs or {}).get(ROLLOUT_NAME) or {})
        unknown = set(engine_kwargs) - _ENGINE_KWARGS
        if unknown:
            raise ValueError(
                f"unknown rollout.engine_kwargs.{ROLLOUT_NAME} keys {sorted(unknown)}; known: {sorted(_ENGINE_KWARGS)}"
            )
        self._num_threads = int(
            engine_kwargs.get("num_threads")
            or configured_threads()
            or max(1, len(os.sched_getaffinity(0)) // max(1, replicas_per_node))
        )
        self._validate_lengths()

        # Calls received, by method: what NPD's scoring costs in requests (get_engine_stats).
        self._calls: Counter[str] = Counter()
        # The buckets of a weight sync received so far, loaded together with its last one.
        self._staged_weights: list[tuple[str, torch.Tensor]] = []
        self._engine: Optional[BatchedEngine] = None
        self._engine_task: Optional[asyncio.Task] = None
        self._waiting: deque[Sequence] = deque()
        self._requests: dict[str, tuple[Sequence, asyncio.Future]] = {}
        # Held by the engine loop for each step, and by anything that must not overlap one
        # (abort, weight loading), so the engine state is only touched between steps.
        self._step_lock = asyncio.Lock()
        self._has_work = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        # Admission: open unless an abort closed the gate or the server is asleep.
        self._gate_closed = False
        self._rejecting = False
        self._asleep_tags: set[str] = set()
        self._admission_open = asyncio.Event()
        self._admission_open.set()

    @property
    def num_threads(self) -> int:
        """The torch threads the engine computes with."""
        return self._num_threads

    def _validate_lengths(self) -> None:
        """Resolve ``max_model_len`` as vLLMHttpServer._validate_configs does."""
        from verl.workers.rollout.utils import get_max_position_embeddings

        max_position_embeddings = get_max_position_embeddings(self.model_config.hf_config)
        if self.config.max_model_len is None:
            self.config.max_model_len = max_position_embeddings
        elif self.config.max_model_len > max_position_embeddings:
            raise ValueError(
                f"max_model_len ({self.config.max_model_len}) should be less than or equal to "
                f"max_position_embeddings ({max_position_embeddings})"
            )

    # ------------------------------------------------------------------ lifecycle

    async def launch_server(self) -> None:
        """Load the model and start the engine loop (the counterpart of vLLM's ``launch_server``)."""
        if self._engine is not None:
            return
        self._engine = await asyncio.to_thread(self._build_engine)
        self._engine_task = asyncio.create_task(self._engine_loop())
        self._engine_task.add_done_callback(self._on_engine_loop_exit)

    def _build_engine(self) -> BatchedEngine:
        import copy

        from transformers import AutoModelForCausalLM

        from verl_npd.engines.cpu_engine import BatchedEngine, eos_token_ids

        torch.set_num_threads(self._num_threads)
        if self.config.full_determinism:
            from verl.workers.engine.utils import enable_full_determinism

            enable_full_determinism(seed=self.replica_rank + self.config.seed)
        if self.config.dtype != "float32":
            logger.info("npd_cpu rollout computes in float32 (rollout.dtype=%s is ignored on CPU)", self.config.dtype)

        # The trainer's config, overrides included; only the attention kernel is CPU-specific.
        hf_config = copy.deepcopy(self.model_config.hf_config)
        load_kwargs = dict(
            dtype=torch.float32, attn_implementation="sdpa", trust_remote_code=self.model_config.trust_remote_code
        )
        if self.config.load_format == "dummy":
            # As vLLM's dummy format: random weights, the trainer's first weight sync overwrites them.
            model = AutoModelForCausalLM.from_config(hf_config, **load_kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(self.model_config.local_path, config=hf_config, **load_kwargs)
        model.eval()

        return BatchedEngine(
            model,
            eos_token_ids=eos_token_ids(self.model_config.tokenizer, self.model_config.generation_config),
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            # vLLM's default when verl leaves it unset.
            logprobs_mode=self.config.logprobs_mode or "raw_logprobs",
            seed=self.replica_rank + self.config.seed,
            num_valid_tokens=len(self.model_config.tokenizer) if self.model_config.tokenizer is not None else None,
        )

    def _on_engine_loop_exit(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("npd_cpu engine loop died", exc_info=task.exception())

    # ------------------------------------------------------------------ generation

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: Optional[list[Any]] = None,
        video_data: Optional[list[Any]] = None,
        audio_data: Optional[list[Any]] = None,
        mm_processor_kwargs: Optional[dict[str, Any]] = None,
        priority: int = 0,
    ) -> TokenOutput:
        """Generate a response to ``prompt_ids`` (same arguments and result as ``vLLMHttpServer.generate``).

        ``priority`` is accepted and ignored: requests are served first come, first served.
        """
        self._calls["generate"] += 1
        if image_data or video_data or audio_data or mm_processor_kwargs:
            raise NotImplementedError("npd_cpu rollout serves text-only models")
        return await self._generate(prompt_ids, sampling_params, request_id)

    async def _generate(self, prompt_ids: list[int], sampling_params: dict[str, Any], request_id: str) -> TokenOutput:
        from verl.utils import normalize_token_ids

        from verl_npd.engines.cpu_engine import Sequence

        if self._engine is None:
            raise RuntimeError("npd_cpu server: launch_server() was not called")
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already in flight")
        prompt_ids = normalize_token_ids(prompt_ids)
        spec = self._sampling_spec(prompt_ids, sampling_params)
        seq = Sequence(request_id=request_id, prompt_ids=prompt_ids, spec=spec)

        if not await self._wait_for_admission():
            return TokenOutput(token_ids=[], stop_reason="aborted", extra_fields={"global_steps": self.global_steps})

        future = asyncio.get_running_loop().create_future()
        self._requests[request_id] = (seq, future)
        self._drained.clear()
        self._waiting.append(seq)
        self._has_work.set()
        try:
            await future
        except asyncio.CancelledError:
            # The caller went away: free the slot now if still queued, else at the next engine step.
            seq.abort_requested = True
            if seq in self._waiting:
                self._waiting.remove(seq)
                self._finish(seq)
            raise
        return self._token_output(seq)

    async def score_prompts(self, prompts: list[list[int]], num_logprobs: int) -> list[Optional[dict[str, Any]]]:
        """Prefill every prompt in one call (NPD's scoring, :mod:`verl_npd.rollout.scoring`): the
        ``extra_fields`` that ``generate`` would return for each with ``prompt_logprobs=num_logprobs``,
        or None for one aborted by a weight sync. The engine prefills them together."""
        self._calls["score_prompts"] += 1
        outputs = await asyncio.gather(
            *[self._generate(prompt, scoring_params(num_logprobs), uuid.uuid4().hex) for prompt in prompts]
        )
        return [None if out.stop_reason == "aborted" else out.extra_fields for out in outputs]

    def _sampling_spec(self, prompt_ids: list[int], sampling_params: dict[str, Any]) -> SamplingSpec:
        """Resolve the request's limits and defaults exactly as ``vLLMHttpServer.generate`` does."""
        from verl_npd.engines.cpu_engine import SamplingSpec

        params = dict(sampling_params)
        max_possible_tokens = self.config.max_model_len - len(prompt_ids)
        if max_possible_tokens < 1:
            raise ValueError(
                f"Prompt length ({len(prompt_ids)}) leaves no room to generate within the "
                f"model's maximum context length ({self.config.max_model_len}); need at least 1 token of headroom."
            )
        if "max_tokens" in params:
            max_tokens = params.pop("max_tokens")
        elif "max_new_tokens" in params:
            max_tokens = params.pop("max_new_tokens")
        else:
            # Bounded by response_length for tensor alignment and by the remaining multi-turn budget.
            max_tokens = min(
                self.config.response_length, self.config.prompt_length + self.config.response_length - len(prompt_ids)
            )
        max_tokens = max(1, min(int(max_tokens), max_possible_tokens))
        params.setdefault("repetition_penalty", self.config.repetition_penalty)
        params.setdefault("ignore_eos", self.config.ignore_eos)
        if self.config.full_determinism:
            params.setdefault("seed", self.replica_rank + self.config.seed)
        return SamplingSpec.from_request(params, max_tokens=max_tokens, vocab_size=self._engine.vocab_size)

    async def _wait_for_admission(self) -> bool:
        """Hold the request while the gate is closed or the server sleeps; False if it must be rejected."""
        while not self._admission_open.is_set():
            if self._gate_closed and self._rejecting:
                return False
            await self._admission_open.wait()
        return True

    def _token_output(self, seq: Sequence) -> TokenOutput:
        extra_fields: dict[str, Any] = {"global_steps": self.global_steps, "num_cached_tokens": 0}
        if seq.first_weights_version is not None:
            # verl's clients keep them (setdefault, verl/workers/rollout/llm_server.py:160-162).
            extra_fields["min_global_steps"] = seq.first_weights_version
            extra_fields["max_global_steps"] = seq.last_weights_version
        if seq.prompt_topk_ids is not None:
            extra_fields["prompt_ids"] = seq.prompt_topk_ids
            extra_fields["prompt_logprobs"] = seq.prompt_topk_logprobs
            extra_fields[PROMPT_TOKEN_LOGPROBS] = seq.prompt_token_logprobs
            extra_fields[PROMPT_TOKEN_RANKS] = seq.prompt_token_ranks
        return TokenOutput(
            token_ids=seq.output_ids,
            log_probs=seq.output_logprobs if seq.spec.logprobs else None,
            stop_reason="aborted" if seq.finish_reason == "abort" else "completed",
            num_preempted=0,
            extra_fields=extra_fields,
        )

    def _finish(self, seq: Sequence, error: Optional[BaseException] = None) -> None:
        _, future = self._requests.pop(seq.request_id, (None, None))
        if future is not None and not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
        if not self._requests:
            self._drained.set()

    async def _engine_loop(self) -> None:
        while True:
            await self._has_work.wait()
            if not self._waiting and self._engine.num_running == 0:
                self._has_work.clear()
                continue
            if self._engine.num_running == 0:
                await asyncio.sleep(_IDLE_ADMISSION_WINDOW_S)
            async with self._step_lock:
                newcomers = self._engine.take_prefill_group(self._waiting)
                try:
                    finished = await asyncio.to_thread(self._engine.step, newcomers, self.global_steps)
                except Exception as error:
                    # Fail the requests of this step instead of the whole server; later requests
                    # start from an empty batch.
                    logger.exception("npd_cpu engine step failed")
                    for seq in newcomers + self._engine.abort_all():
                        self._finish(seq, error)
                    continue
                for seq in finished:
                    self._finish(seq)

    # ------------------------------------------------------------------ control (called by verl)

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict[str, Any]:
        """Close the admission gate and end all in-flight requests as "aborted" (partial tokens kept).

        Args:
            reset_prefix_cache: accepted for vLLM parity; there is no prefix cache.
            reject_request: answer requests arriving while the gate is closed at once with an
                empty "aborted" output instead of holding them until ``resume_generation``.

        Returns:
            ``{"aborted_count": int, "request_ids": list[str]}``, as vLLM's server.
        """
        self._gate_closed = True
        self._rejecting = reject_request
        self._update_admission()
        async with self._step_lock:
            aborted = list(self._waiting) + self._engine.abort_all()
            self._waiting.clear()
            for seq in aborted:
                seq.finish_reason = "abort"
                self._finish(seq)
        request_ids = [seq.request_id for seq in aborted]
        logger.info("npd_cpu: aborted %d requests", len(request_ids))
        return {"aborted_count": len(request_ids), "request_ids": request_ids}

    async def abort_request(self, request_id: str, reset_prefix_cache: bool = True) -> dict[str, Any]:
        """End one request as "aborted"; it returns the tokens generated so far."""
        entry = self._requests.get(request_id)
        if entry is None:
            return {"aborted": False, "request_id": request_id, "error": f"Request {request_id} not found"}
        seq, _ = entry
        seq.abort_requested = True
        if seq in self._waiting:
            self._waiting.remove(seq)
            seq.finish_reason = "abort"
            self._finish(seq)
        return {"aborted": True, "request_id": request_id}

    async def resume_generation(self) -> None:
        """Reopen the gate closed by ``abort_all_requests``; held requests proceed."""
        self._gate_closed = False
        self._rejecting = False
        self._update_admission()

    async def sleep(self) -> None:
        """Hybrid/colocated: let in-flight requests finish, then hold new ones until ``wake_up``."""
        if not self.config.free_cache_engine or self.rollout_mode == RolloutMode.STANDALONE:
            return
        await self._drained.wait()
        self._asleep_tags = {"weights", "kv_cache"}
        self._update_admission()

    async def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """Undo ``sleep`` for ``tags`` (default: all); generation resumes once nothing is asleep."""
        self._asleep_tags -= set(tags) if tags else set(self._asleep_tags)
        self._update_admission()

    def _update_admission(self) -> None:
        if self._gate_closed or self._asleep_tags:
            self._admission_open.clear()
        else:
            self._admission_open.set()

    async def wait_for_requests_to_drain(self) -> None:
        """Return once no admitted request is in flight."""
        await self._drained.wait()

    async def update_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], global_steps: Optional[int] = None, last: bool = True
    ) -> int:
        """Load ``(hf_name, tensor)`` pairs into the model; optionally tag the new weight version.

        A sync sent in buckets calls this once per bucket with ``last=False`` but for the final one:
        the buckets are held until then and loaded together, between two engine steps, with the
        version set at the same moment, so that no step computes with part of the old weights and
        part of the new (a colocated replica keeps generating through a sync). verl's vLLM replica
        receives every bucket in one ``collective_rpc`` (verl/workers/rollout/vllm_rollout/vllm_rollout.py:228-244),
        which vLLM's engine core runs between two steps.

        Returns:
            The number of tensors loaded (0 for a bucket held for later).
        """
        self._staged_weights.extend(weights)
        if not last:
            return 0
        staged, self._staged_weights = self._staged_weights, []
        async with self._step_lock:
            loaded = await asyncio.to_thread(self._engine.load_weights, staged)
            if global_steps is not None:
                self.global_steps = global_steps
        return loaded

    async def set_global_steps(self, global_steps: int) -> None:
        """Set the weight version returned in ``extra_fields["global_steps"]``."""
        self.global_steps = global_steps

    async def clear_kv_cache(self) -> None:
        """No-op: KV caches live only as long as their batch, and there is no prefix cache."""

    async def release_kv_cache(self) -> None:
        """No-op: see ``clear_kv_cache``."""

    async def resume_kv_cache(self) -> None:
        """No-op: see ``clear_kv_cache``."""

    async def start_profile(self, **kwargs: Any) -> None:
        """No-op: rollout profiling is not implemented for npd_cpu."""

    async def stop_profile(self) -> None:
        """No-op: rollout profiling is not implemented for npd_cpu."""

    def get_server_address(self) -> str:
        """A unique id for verl's load balancer (it keys servers by address); there is no HTTP endpoint."""
        return f"{ROLLOUT_NAME}://{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_actor_id()}"

    def get_rollout_config(self) -> RolloutConfig:
        """The server's rollout config, with ``max_model_len`` resolved (as vLLMHttpServer's)."""
        return self.config

    def get_engine_stats(self) -> dict[str, int]:
        """Batching counters of the engine (prefill batches, decode steps, largest batch, ...)."""
        stats = self._engine.stats
        return {
            "prefill_batches": stats.prefill_batches,
            "prefill_sequences": stats.prefill_sequences,
            "decode_steps": stats.decode_steps,
            "decode_sequence_steps": stats.decode_sequence_steps,
            "max_batch_size": stats.max_batch_size,
            "forward_passes": stats.forward_passes,
            "generate_calls": self._calls["generate"],
            "score_prompts_calls": self._calls["score_prompts"],
        }


class CPURolloutReplica(RolloutReplica):
    """One ``npd_cpu`` server per replica, placed on the node of the replica's first worker.

    The server actor requests no CPU or GPU from Ray: the replica's workers already hold its share
    of the resource pool (logical GPUs on CPU machines), just as vLLM's engine processes run
    outside Ray's accounting. Reserving a CPU on top would deadlock small machines where the
    placement groups hold every CPU.
    """

    async def launch_servers(self) -> None:
        """Start the replica's server actor on its first worker's node and load the model."""
        if len(self.workers) != self.world_size:
            raise RuntimeError(f"replica {self.replica_rank}: {len(self.workers)} workers, expected {self.world_size}")
        if self.nnodes != 1:
            raise NotImplementedError("npd_cpu rollout runs each replica in one process: it cannot span nodes")
        node_id = await self.workers[0].__ray_call__.remote(lambda worker: ray.get_runtime_context().get_node_id())
        server = (
            ray.remote(CPURolloutServer)
            .options(
                name=_server_name(self.replica_rank, self.is_reward_model, self.is_teacher_model, self.name_suffix),
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
                max_concurrency=self.max_concurrency,
                num_cpus=0,
            )
            .remote(
                config=self.config,
                model_config=self.model_config,
                rollout_mode=self.rollout_mode,
                replica_rank=self.replica_rank,
                replicas_per_node=max(1, self.gpus_per_node // self.gpus_per_replica_node),
            )
        )
        await server.launch_server.remote()
        self.servers = [server]
        self._server_handle = server
        self._server_address = await server.get_server_address.remote()

    async def abort_request(self, request_id: str) -> dict[str, Any]:
        """Abort one request (``vLLMReplica.abort_request`` parity)."""
        return await self.servers[0].abort_request.remote(request_id)


class CPUServerAdapter(BaseRollout):
    """Client of a replica's ``npd_cpu`` server inside a trainer worker (hybrid) or ``CheckpointEngineWorker``.

    Like vLLM's ``ServerAdapter``, every rank of a replica gets one, and rank 0 of the replica (the
    leader) talks to the server, found lazily by name because the server starts after the trainer.
    """

    def __init__(
        self, config: RolloutConfig, model_config: HFModelConfig, device_mesh: Any, replica_rank: int = -1
    ) -> None:
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ["RANK"])
        replica_world_size = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        self.replica_rank = rank // replica_world_size if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % replica_world_size
        self.is_leader_rank = self.rollout_rank == 0
        self._server: Optional[ray.actor.ActorHandle] = None

    @property
    def server(self) -> ray.actor.ActorHandle:
        """The replica's server actor (looked up on first use)."""
        if self._server is None:
            self._server = ray.get_actor(_server_name(self.replica_rank, False, False, ""))
        return self._server

    async def resume(self, tags: list[str]) -> None:
        """Wake the server's ``tags`` ("weights", "kv_cache") after a ``release``."""
        if self.config.free_cache_engine and self.is_leader_rank:
            await self.server.wake_up.remote(tags=tags)

    async def release(self) -> None:
        """Put the server to sleep (hybrid mode, before training), as vLLM's adapter does."""
        if self.config.free_cache_engine and self.is_leader_rank:
            await self.server.sleep.remote()

    async def update_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]] | AsyncIterator[tuple[str, torch.Tensor]],
        global_steps: Optional[int] = None,
        wire_format: str = "named_tensors",
        peft_config: Any = None,
        **kwargs: Any,
    ) -> None:
        """Stream ``(name, tensor)`` pairs to the server in buckets of ``update_weights_bucket_megabytes``.

        Every rank iterates ``weights`` to the end, because with FSDP producing each full tensor is
        a collective; only the leader sends.
        """
        from verl.workers.rollout.utils import ensure_async_iterator

        if wire_format != "named_tensors":
            raise NotImplementedError(f"npd_cpu rollout receives full tensors only, got wire_format={wire_format!r}")
        if peft_config is not None:
            raise NotImplementedError(
                "npd_cpu rollout cannot serve LoRA adapters; set actor_rollout_ref.model.lora.merge=True"
            )

        bucket_bytes = self.config.checkpoint_engine.update_weights_bucket_megabytes << 20
        bucket: list[tuple[str, torch.Tensor]] = []
        bucket_size = 0
        async for name, tensor in ensure_async_iterator(weights):
            if not self.is_leader_rank:
                continue
            # Ray serialises the tensor at .remote() time, so no copy is needed here.
            tensor = tensor.detach().to("cpu")
            bucket.append((name, tensor))
            bucket_size += tensor.nbytes
            if bucket_size >= bucket_bytes:
                await self._push(bucket, last=False)
                bucket, bucket_size = [], 0
        if self.is_leader_rank:
            await self._push(bucket, global_steps=global_steps, last=True)

    async def _push(self, bucket: list[tuple[str, torch.Tensor]], **kwargs: Any) -> None:
        """Send one bucket; a dead server becomes an error that names it, not a bare ``ActorDiedError``."""
        try:
            await self.server.update_weights.remote(bucket, **kwargs)
        except ray.exceptions.RayActorError as e:
            name = _server_name(self.replica_rank, False, False, "")
            raise RuntimeError(
                f"the weight sync to rollout server {name} failed: its process died ({type(e).__name__})"
            ) from None

"""Batched token-in/token-out generation with a Hugging Face causal LM on CPU.

This module is the compute half of the ``npd_cpu`` rollout backend (:mod:`verl_npd.engines.cpu_server`
is the Ray/verl half). It has no Ray or asyncio in it, so it can be driven step by step from a
worker thread and tested on its own.

Scheduling is continuous batching over one running batch:

* every :meth:`BatchedEngine.step` first prefills the newly admitted sequences together (left
  padded, explicit position ids), samples their first token, and merges their KV cache into the
  running batch;
* then it decodes one token for every running sequence in a single forward pass;
* finished rows are dropped from the batch (and the KV cache) right away, so a long generation does
  not make the short ones pay for its padding.

Sampling and log-probs follow vLLM's v1 sampler, which is what verl's own rollout uses, so that
what verl's trainer sees from this backend means the same as on GPU:

* temperature < 1e-5 is greedy (top-k/top-p are then ignored, as in ``vllm.SamplingParams``);
* top-k then top-p are applied to the temperature-scaled logits; ties at the k-th value are kept;
* the returned per-token log-prob is either ``raw_logprobs`` (log-softmax of the model's logits) or
  ``processed_logprobs`` (log-softmax of the temperature-scaled, top-k/top-p-masked logits, the
  default in verl's ``rollout.yaml``); both coincide for temperature 1 without top-k/top-p;
* prompt log-probs are always raw, laid out as verl's ``extract_prompt_logprobs`` lays out vLLM's;
* logits of ids the tokenizer does not know (the padded tail of the embedding matrix) are ``-inf``,
  as verl makes vLLM do (``monkey_patch_compute_logits`` in verl/workers/rollout/vllm_rollout/utils.py).
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

logger = logging.getLogger(__name__)

# vLLM's threshold below which a temperature means greedy decoding (vllm/sampling_params.py).
_GREEDY_TEMPERATURE_EPS = 1e-5

# A prefill that returns prompt log-probs materialises logits for every prompt position. This caps
# that tensor (in float32 elements: 2**28 is 1 GiB) when several such prompts are prefilled together;
# a single prompt is always admitted.
_MAX_PREFILL_LOGITS_ELEMENTS = 2**28

LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")

# Request keys that only change how vLLM renders text; this backend returns token ids only.
_TEXT_ONLY_PARAMS = frozenset({"detokenize", "skip_special_tokens", "spaces_between_special_tokens"})
# Request keys accepted only at the value that disables them.
_NEUTRAL_ONLY_PARAMS = {
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "min_p": 0.0,
    "min_tokens": 0,
    "n": 1,
}
_SUPPORTED_PARAMS = frozenset(
    {"temperature", "top_p", "top_k", "logprobs", "prompt_logprobs", "ignore_eos", "stop_token_ids", "seed"}
)
# String stops need detokenisation; accepted only when empty.
_STOP_STRINGS_PARAM = "stop"


@dataclass(frozen=True)
class SamplingSpec:
    """Validated sampling parameters of one request (the subset of ``vllm.SamplingParams`` verl uses)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """``<= 0`` disables top-k (vLLM accepts both 0 and -1)."""
    logprobs: bool = False
    """Return the log-prob of each sampled token."""
    prompt_logprobs: int | None = None
    """``None``: none; 0: log-prob of each actual next prompt token; k > 0: the top-k at each position."""
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_TEMPERATURE_EPS

    @classmethod
    def from_request(cls, params: dict[str, Any], max_tokens: int, vocab_size: int) -> SamplingSpec:
        """Build a spec from a vLLM-style sampling-params dict whose length keys were already resolved.

        Raises:
            ValueError: for a parameter this backend does not implement (at a non-neutral value),
                or for an out-of-range value.
        """
        # vLLM treats None as "unset"; so do we.
        params = {key: value for key, value in params.items() if value is not None}
        accepted = _SUPPORTED_PARAMS | _TEXT_ONLY_PARAMS | set(_NEUTRAL_ONLY_PARAMS) | {_STOP_STRINGS_PARAM}
        unknown = set(params) - accepted
        if unknown:
            raise ValueError(
                f"npd_cpu rollout does not support sampling params {sorted(unknown)}; supported: "
                f"{sorted(_SUPPORTED_PARAMS | {'max_tokens', 'max_new_tokens'})}"
            )
        for key, neutral in _NEUTRAL_ONLY_PARAMS.items():
            if key in params and params[key] != neutral:
                raise ValueError(f"npd_cpu rollout supports only {key}={neutral}, got {params[key]!r}")
        if params.get(_STOP_STRINGS_PARAM):
            raise ValueError("npd_cpu rollout does not detokenize, so string 'stop' is unsupported; use stop_token_ids")

        temperature = float(params.get("temperature", 1.0))
        top_p = float(params.get("top_p", 1.0))
        top_k = int(params.get("top_k", -1))
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if temperature < _GREEDY_TEMPERATURE_EPS:
            # Greedy ignores truncation, as vllm.SamplingParams resets these for temperature 0.
            top_p, top_k = 1.0, -1

        prompt_logprobs = params.get("prompt_logprobs")
        if prompt_logprobs is not None:
            prompt_logprobs = int(prompt_logprobs)
            if not 0 <= prompt_logprobs <= vocab_size:
                raise ValueError(f"prompt_logprobs must be in [0, vocab_size={vocab_size}], got {prompt_logprobs}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        seed = params.get("seed")
        return cls(
            max_tokens=int(max_tokens),
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            logprobs=bool(params.get("logprobs", False)),
            prompt_logprobs=prompt_logprobs,
            ignore_eos=bool(params.get("ignore_eos", False)),
            stop_token_ids=tuple(int(t) for t in params.get("stop_token_ids", ())),
            seed=None if seed is None else int(seed),
        )


@dataclass(eq=False)
class Sequence:
    """One request's state, owned by the engine while it is waiting or running."""

    request_id: str
    prompt_ids: list[int]
    spec: SamplingSpec
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    prompt_topk_ids: list[list[int]] | None = None
    prompt_topk_logprobs: list[list[float]] | None = None
    # log p(prompt token t+1 | tokens <= t) for every t, then one zero pad entry (S entries): what
    # vLLM's prompt_logprobs also returns beside the top-k, so one prefill gives both.
    prompt_token_logprobs: list[float] | None = None
    # The rank of each prompt token t+1 among all tokens (1 = most likely), as vLLM reports it.
    prompt_token_ranks: list[int] | None = None
    finish_reason: str | None = None
    """``"stop"`` (eos or stop token), ``"length"`` (max_tokens) or ``"abort"``."""
    abort_requested: bool = False
    """Set from outside the engine; the engine drops the sequence at the start of its next step."""
    generator: torch.Generator | None = None
    first_weights_version: int | None = None
    """The ``weights_version`` of the step that produced the first output token (and the prompt's KV)."""
    last_weights_version: int | None = None
    """... and of the step that produced the last one. They differ when the weights changed in between."""

    def __post_init__(self) -> None:
        # vLLM gives a seeded request its own generator, so its samples do not depend on what else is
        # in the batch.
        if self.spec.seed is not None and self.generator is None:
            self.generator = torch.Generator().manual_seed(self.spec.seed)

    @property
    def needs_prompt_logprobs(self) -> bool:
        return self.spec.prompt_logprobs is not None


@dataclass
class EngineStats:
    """Counters that show how requests were batched (read by tests and for debugging)."""

    prefill_batches: int = 0
    prefill_sequences: int = 0
    decode_steps: int = 0
    decode_sequence_steps: int = 0
    max_batch_size: int = 0

    @property
    def forward_passes(self) -> int:
        return self.prefill_batches + self.decode_steps


@dataclass
class _RunningBatch:
    """Sequences being decoded together, with their shared left-padded KV cache.

    The cache holds every token of a row except its last sampled one (``last_tokens``), which is
    fed in by the next decode step. ``attention_mask`` has one column per cache position.
    """

    seqs: list[Sequence]
    cache: Cache
    attention_mask: torch.Tensor
    last_tokens: torch.Tensor

    def select(self, rows: list[int], trim_cache: bool) -> None:
        """Keep only ``rows`` and drop cache columns that became padding for every remaining row."""
        index = torch.tensor(rows, dtype=torch.long)
        self.cache.batch_select_indices(index)
        self.seqs = [self.seqs[i] for i in rows]
        self.attention_mask = self.attention_mask[index]
        self.last_tokens = self.last_tokens[index]
        if trim_cache:
            # The leading columns that no row attends to any more are dead weight in every later step.
            lead = int(self.attention_mask.any(dim=0).int().argmax())
            if lead > 0:
                for layer in self.cache.layers:
                    layer.keys = layer.keys[..., lead:, :]
                    layer.values = layer.values[..., lead:, :]
                self.attention_mask = self.attention_mask[:, lead:]


def eos_token_ids(tokenizer, generation_config) -> set[int]:
    """The tokenizer's eos plus the generation config's, which is what vLLM stops on (either may be None)."""
    eos: set[int] = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    generation_eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(generation_eos, int):
        eos.add(generation_eos)
    elif generation_eos:
        eos.update(int(token) for token in generation_eos)
    return eos


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k, then outside its top-p nucleus, with ``-inf``.

    Same rule as vLLM's sampler: top-k keeps every logit >= the k-th largest (ties included); top-p
    is computed on the top-k-truncated distribution and drops the ascending-order tail whose
    cumulative probability is <= 1 - p, always keeping the most likely token.

    Args:
        logits: ``[B, V]`` temperature-scaled logits.
        top_k: ``[B]`` number of tokens to keep (``V`` disables it).
        top_p: ``[B]`` nucleus mass (1.0 disables it).
    """
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab_size = logits.shape[-1]
    kth_largest = sorted_logits.gather(1, (vocab_size - top_k).clamp(min=0).unsqueeze(1))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    tail = cumulative <= (1.0 - top_p).unsqueeze(1)
    tail[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(tail, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


class BatchedEngine:
    """Continuous-batching generation over a HF causal LM. Not thread-safe: one caller at a time.

    Args:
        model: the causal LM, already on CPU in eval mode.
        eos_token_ids: tokens that end a sequence unless the request sets ``ignore_eos``.
        max_num_seqs: most sequences in the running batch (``rollout.max_num_seqs``).
        max_num_batched_tokens: most padded tokens in one prefill (``rollout.max_num_batched_tokens``);
            a single longer prompt is still admitted alone.
        logprobs_mode: ``raw_logprobs`` or ``processed_logprobs`` (see the module docstring).
        seed: seed of the generator used by requests that bring no seed of their own.
        num_valid_tokens: ``len(tokenizer)``; logits of larger ids are masked. ``None``: the whole vocabulary.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        eos_token_ids: Iterable[int],
        max_num_seqs: int,
        max_num_batched_tokens: int,
        logprobs_mode: str,
        seed: int,
        num_valid_tokens: int | None = None,
    ) -> None:
        if logprobs_mode not in LOGPROBS_MODES:
            raise NotImplementedError(
                f"npd_cpu rollout supports logprobs_mode in {LOGPROBS_MODES}, got {logprobs_mode!r}"
            )
        self.model = model
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.logprobs_mode = logprobs_mode
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.num_valid_tokens = self.vocab_size if num_valid_tokens is None else min(num_valid_tokens, self.vocab_size)
        self.stats = EngineStats()
        self._generator = torch.Generator().manual_seed(seed)
        self._running: _RunningBatch | None = None
        # Merging caches of different lengths is only written for plain DynamicLayer caches (full
        # attention). Other cache layouts (sliding window, linear attention) fall back to admitting
        # new sequences only when the running batch is empty. Decided at the first prefill.
        self._mergeable_cache: bool | None = None
        self._weights = self._weight_targets(model)
        self._weights_version: int | None = None

    @property
    def num_running(self) -> int:
        return 0 if self._running is None else len(self._running.seqs)

    def take_prefill_group(self, waiting: deque[Sequence]) -> list[Sequence]:
        """Pop from the front of ``waiting`` the sequences the next step should prefill together.

        FIFO; stops at the running-batch capacity, at the prefill token budget, and where requests
        that need all-position logits (prompt log-probs) meet ones that do not, so that generation
        requests never pay for a full-vocabulary logits tensor.
        """
        capacity = self.max_num_seqs - self.num_running
        if self.num_running and not self._mergeable_cache:
            capacity = 0
        group: list[Sequence] = []
        longest = 0
        while waiting and len(group) < capacity:
            candidate = waiting[0]
            if group and candidate.needs_prompt_logprobs != group[0].needs_prompt_logprobs:
                break
            padded_tokens = max(longest, len(candidate.prompt_ids)) * (len(group) + 1)
            if group and padded_tokens > self.max_num_batched_tokens:
                break
            if group and candidate.needs_prompt_logprobs:
                if padded_tokens * self.vocab_size > _MAX_PREFILL_LOGITS_ELEMENTS:
                    break
            group.append(waiting.popleft())
            longest = max(longest, len(candidate.prompt_ids))
        return group

    @torch.inference_mode()
    def step(self, newcomers: list[Sequence], weights_version: int | None = None) -> list[Sequence]:
        """Prefill ``newcomers``, then decode one token for every running sequence.

        ``weights_version`` labels the weights this step computes with; every sequence that gets a
        token records it (``first_weights_version``, ``last_weights_version``).

        Returns:
            The sequences that finished during this step (their ``finish_reason`` is set).
        """
        self._weights_version = weights_version
        finished = self._drop_aborted()
        for seq in newcomers:
            if seq.abort_requested:
                seq.finish_reason = "abort"
                finished.append(seq)
        newcomers = [seq for seq in newcomers if not seq.abort_requested]
        if newcomers:
            batch, done = self._prefill(newcomers)
            finished.extend(done)
            if batch is not None:
                self._running = batch if self._running is None else self._merge(self._running, batch)
        if self._running is not None:
            finished.extend(self._decode())
        return finished

    def abort_all(self) -> list[Sequence]:
        """Stop every running sequence (``finish_reason="abort"``, tokens so far kept) and free the cache."""
        aborted = [] if self._running is None else self._running.seqs
        for seq in aborted:
            seq.finish_reason = "abort"
        self._running = None
        return aborted

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy HF-named tensors into the model (cast to the model's dtype); return how many were loaded.

        The whole call is validated before anything is written, so a bad name or shape leaves the
        model untouched. Tied weights (e.g. ``lm_head.weight`` and ``model.embed_tokens.weight``)
        share storage, so either name updates both.

        Raises:
            KeyError: a name matches no parameter or buffer of the model.
            ValueError: a tensor's shape differs from the model's.
        """
        resolved, unknown = [], []
        for name, tensor in named_tensors:
            target = self._resolve_weight_name(name)
            if target is None:
                unknown.append(name)
                continue
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"weight {name!r} has shape {tuple(tensor.shape)}, the rollout model expects {tuple(target.shape)}"
                )
            resolved.append((target, tensor))
        if unknown:
            raise KeyError(
                f"npd_cpu rollout: {len(unknown)} weight name(s) match no parameter of "
                f"{type(self.model).__name__}: {unknown[:8]}. Do trainer and rollout load the same architecture?"
            )
        for target, tensor in resolved:
            target.copy_(tensor)
        return len(resolved)

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _weight_targets(model: PreTrainedModel) -> dict[str, torch.Tensor]:
        # remove_duplicate=False keeps every alias of a tied weight, so the trainer may send either name.
        targets = dict(model.named_buffers(remove_duplicate=False))
        targets.update(model.named_parameters(remove_duplicate=False))
        return targets

    def _resolve_weight_name(self, name: str) -> torch.Tensor | None:
        if name in self._weights:
            return self._weights[name]
        # verl's FSDP engine exports checkpoint-style names (verl/utils/model.py::convert_weight_keys);
        # map them back to module names the way transformers does when loading a checkpoint.
        for pattern, replacement in (getattr(self.model, "_checkpoint_conversion_mapping", None) or {}).items():
            renamed, count = re.subn(pattern, replacement, name)
            if count and renamed in self._weights:
                return self._weights[renamed]
        return None

    def _drop_aborted(self) -> list[Sequence]:
        batch = self._running
        if batch is None or not any(seq.abort_requested for seq in batch.seqs):
            return []
        dropped = [seq for seq in batch.seqs if seq.abort_requested]
        for seq in dropped:
            seq.finish_reason = "abort"
        self._keep_rows([i for i, seq in enumerate(batch.seqs) if not seq.abort_requested])
        return dropped

    def _keep_rows(self, rows: list[int]) -> None:
        if not rows:
            self._running = None
        elif len(rows) < len(self._running.seqs):
            self._running.select(rows, trim_cache=bool(self._mergeable_cache))

    def _prefill(self, seqs: list[Sequence]) -> tuple[_RunningBatch | None, list[Sequence]]:
        longest = max(len(seq.prompt_ids) for seq in seqs)
        input_ids = torch.zeros(len(seqs), longest, dtype=torch.long)
        attention_mask = torch.zeros(len(seqs), longest, dtype=torch.long)
        for row, seq in enumerate(seqs):
            input_ids[row, longest - len(seq.prompt_ids) :] = torch.tensor(seq.prompt_ids, dtype=torch.long)
            attention_mask[row, longest - len(seq.prompt_ids) :] = 1
        # Left padding shifts each row, so positions must count real tokens only.
        position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
        all_positions = any(seq.needs_prompt_logprobs for seq in seqs)
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=0 if all_positions else 1,
        )
        logits = self._mask_invalid(output.logits.float())
        if all_positions:
            for row, seq in enumerate(seqs):
                if seq.needs_prompt_logprobs:
                    self._set_prompt_logprobs(seq, logits[row, longest - len(seq.prompt_ids) : longest - 1])
        cache = output.past_key_values
        if self._mergeable_cache is None:
            self._mergeable_cache = all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", ()))
            if not self._mergeable_cache:
                logger.warning("npd_cpu rollout: this model's KV cache cannot be merged; batching only new arrivals")
        self.stats.prefill_batches += 1
        self.stats.prefill_sequences += len(seqs)
        self.stats.max_batch_size = max(self.stats.max_batch_size, len(seqs))

        tokens, done = self._sample_and_append(logits[:, -1], seqs)
        batch = _RunningBatch(seqs=seqs, cache=cache, attention_mask=attention_mask, last_tokens=tokens)
        finished = [seq for seq, is_done in zip(seqs, done, strict=True) if is_done]
        keep = [row for row, is_done in enumerate(done) if not is_done]
        if not keep:
            return None, finished
        if len(keep) < len(seqs):
            batch.select(keep, trim_cache=bool(self._mergeable_cache))
        return batch, finished

    def _set_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Fill verl's vLLM layout: entry t scores prompt token t+1, then one zero pad entry (S entries)."""
        logprobs = logits.log_softmax(dim=-1)
        k = seq.spec.prompt_logprobs
        actual_ids = torch.tensor(seq.prompt_ids[1:], dtype=torch.long).unsqueeze(1)
        actual = logprobs.gather(1, actual_ids)
        if k == 0:
            ids, values = actual_ids, actual
        else:
            values, ids = logprobs.topk(k, dim=-1, sorted=True)
        width = max(k, 1)
        seq.prompt_topk_ids = ids.tolist() + [[0] * width]
        seq.prompt_topk_logprobs = values.tolist() + [[0.0] * width]
        seq.prompt_token_logprobs = actual.squeeze(1).tolist() + [0.0]
        seq.prompt_token_ranks = ((logprobs > actual).sum(dim=-1) + 1).tolist()

    @staticmethod
    def _merge(old: _RunningBatch, new: _RunningBatch) -> _RunningBatch:
        """Stack two running batches, left-padding the shorter cache (padding is masked out)."""
        length = max(old.attention_mask.shape[1], new.attention_mask.shape[1])

        def pad(tensor: torch.Tensor, dim_from_end: int) -> torch.Tensor:
            missing = length - tensor.shape[-dim_from_end]
            if missing == 0:
                return tensor
            return F.pad(tensor, (0, 0) * (dim_from_end - 1) + (missing, 0))

        for old_layer, new_layer in zip(old.cache.layers, new.cache.layers, strict=True):
            old_layer.keys = torch.cat([pad(old_layer.keys, 2), pad(new_layer.keys, 2)], dim=0)
            old_layer.values = torch.cat([pad(old_layer.values, 2), pad(new_layer.values, 2)], dim=0)
        return _RunningBatch(
            seqs=old.seqs + new.seqs,
            cache=old.cache,
            attention_mask=torch.cat([pad(old.attention_mask, 1), pad(new.attention_mask, 1)], dim=0),
            last_tokens=torch.cat([old.last_tokens, new.last_tokens]),
        )

    def _decode(self) -> list[Sequence]:
        batch = self._running
        # The pending token's position is the number of real tokens already in the cache.
        position_ids = batch.attention_mask.sum(dim=-1, keepdim=True)
        attention_mask = F.pad(batch.attention_mask, (0, 1), value=1)
        output = self.model(
            input_ids=batch.last_tokens.unsqueeze(1),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=batch.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        batch.cache = output.past_key_values
        batch.attention_mask = attention_mask
        self.stats.decode_steps += 1
        self.stats.decode_sequence_steps += len(batch.seqs)
        self.stats.max_batch_size = max(self.stats.max_batch_size, len(batch.seqs))

        logits = self._mask_invalid(output.logits[:, -1].float())
        batch.last_tokens, done = self._sample_and_append(logits, batch.seqs)
        finished = [seq for seq, is_done in zip(batch.seqs, done, strict=True) if is_done]
        if finished:
            self._keep_rows([row for row, is_done in enumerate(done) if not is_done])
        return finished

    def _mask_invalid(self, logits: torch.Tensor) -> torch.Tensor:
        if self.num_valid_tokens < self.vocab_size:
            logits[..., self.num_valid_tokens :] = float("-inf")
        return logits

    def _sample_and_append(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, list[bool]]:
        """Sample one token per row, record it (and its log-prob), and report which rows finished."""
        tokens, logprobs = self._sample(logits, seqs)
        done = []
        for row, seq in enumerate(seqs):
            token = int(tokens[row])
            seq.output_ids.append(token)
            if seq.first_weights_version is None:
                seq.first_weights_version = self._weights_version
            seq.last_weights_version = self._weights_version
            if seq.spec.logprobs:
                seq.output_logprobs.append(float(logprobs[row]))
            # Same order as vLLM's check_stop; both reasons map to verl's "completed".
            if len(seq.output_ids) >= seq.spec.max_tokens:
                seq.finish_reason = "length"
            elif (not seq.spec.ignore_eos and token in self.eos_token_ids) or token in seq.spec.stop_token_ids:
                seq.finish_reason = "stop"
            done.append(seq.finish_reason is not None)
        return tokens, done

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
        greedy = torch.tensor([seq.spec.greedy for seq in seqs])
        processed = logits
        if greedy.all():
            tokens = logits.argmax(dim=-1)
        else:
            # Greedy rows in a mixed batch go through the sampling path at temperature 1 (as in vLLM),
            # which only matters for their processed log-probs; their token is still the argmax.
            temperatures = torch.tensor([1.0 if seq.spec.greedy else seq.spec.temperature for seq in seqs])
            processed = logits / temperatures.unsqueeze(1)
            top_k = torch.tensor(
                [seq.spec.top_k if 0 < seq.spec.top_k < self.vocab_size else self.vocab_size for seq in seqs]
            )
            top_p = torch.tensor([seq.spec.top_p for seq in seqs], dtype=logits.dtype)
            if (top_k < self.vocab_size).any() or (top_p < 1.0).any():
                processed = apply_top_k_top_p(processed, top_k, top_p)
            probs = processed.softmax(dim=-1)
            # argmax(p / q) with q ~ Exp(1) draws from p (the exponential race vLLM samples with); it
            # lets each seeded row draw from its own generator inside one batched op.
            noise = torch.empty_like(probs).exponential_(generator=self._generator)
            for row, seq in enumerate(seqs):
                if seq.generator is not None:
                    noise[row].exponential_(generator=seq.generator)
            tokens = torch.where(greedy, logits.argmax(dim=-1), (probs / noise).argmax(dim=-1))
        if not any(seq.spec.logprobs for seq in seqs):
            return tokens, None
        source = logits if self.logprobs_mode == "raw_logprobs" else processed
        return tokens, source.log_softmax(dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)

"""The distillation loss across tokenizers (docs/algorithm.md, "Across tokenizers"): pure torch.

Input, per row t of a packed sequence (row t predicts token t + 1), as
:mod:`verl_npd.rollout.cross_tokenizer` projects the teacher's prefill onto the student's tokens:

- ``teacher_ids`` ``[..., K]``: student ids (the teacher's candidates projected onto the student's
  tokens), or ``UNMATCHED`` (-1) for an entry the student cannot write, and for every entry of a
  student token that spans several teacher tokens;
- ``teacher_log_probs`` ``[..., K]``: their teacher log-probs (a span's: merged, see below);
- ``span`` ``[...]``: how many student rows the row's target covers: 1 for one token, m > 1 at the
  first of a character's byte pieces, 0 where the row has no target of its own (the later pieces,
  the prompt).

Per row with ``span`` m >= 1, two terms:

- **matched**: the configured loss (``forward_kl_topk``, ``reverse_kl_topk``, ``jsd`` or ``ce``, with
  its tail mode) on the entries with a student id, as if the others were not in K
  (``per_token_distillation_loss(entry_mask=...)``): the teacher's probability of the student's
  next token being that one is a target for the student's.
- **ULD** (Universal Logit Distillation, Boizard et al. 2024; GOLD's ``uld_use_hybrid_loss`` splits
  the same way): the L1 distance between the u largest probabilities of the two sides, rank by
  rank, where u is the number of the row's unmatched entries: the teacher's unmatched entries
  sorted, against the student's largest probabilities outside the row's matched ids. A span's
  probabilities are merged as GOLD's "observed" strategy merges them: each candidate for its first
  token times the probability of the rest of the span as written, on the teacher's side (in the
  projection) and on the student's: ``log q_S(v) = log p_S(v | row t) + sum_{j=1}^{m-1} log p_S(y_{t+j})``,
  which is differentiable through every row of the span. Sorting needs no shared vocabulary: it
  asks the student to be as sure as the teacher, not sure of the same token, which is why it is
  only used where no student id can be found (docs/algorithm.md, "Across tokenizers").

``loss = matched + uld_weight * ULD``. With one tokenizer every entry is matched and every span is 1:
the ULD term is 0 and the loss is the configured loss exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from verl_npd.losses.distill import (
    LOG_PROB_FLOOR,
    LossMode,
    NPDLossConfig,
    per_token_distillation_loss,
    student_log_probs_at,
)

# The teacher entry of a row whose string the student's vocabulary lacks.
UNMATCHED = -1
# The batch's per-row span tensor (nested like the teacher's top-k) and the ULD weight (non-tensor
# data): their presence selects this loss in the verl registration.
SPAN_KEY = "npd_teacher_span"
ULD_WEIGHT_KEY = "npd_uld_weight"


class CrossTokenizerOutput(NamedTuple):
    loss: torch.Tensor
    """Per row, ``matched + uld_weight * uld`` (differentiable w.r.t. the student logits)."""
    uld: torch.Tensor
    """The ULD term alone (detached diagnostic)."""
    student_topk_mass: torch.Tensor
    """The student's mass on the matched entries (detached diagnostic)."""
    teacher_topk_mass: torch.Tensor
    """The teacher's mass on the matched entries (detached diagnostic)."""


def span_continuation_log_probs(target_log_probs: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """``sum_{j=1}^{m_t - 1} target_log_probs[..., t + j]`` per row t (``m_t = span[..., t]``; 0 where
    m_t <= 1): the log-probability of the rest of the span as written. Along the last dim, which a
    span never leaves."""
    out = torch.zeros_like(target_log_probs)
    longest = int(span.max()) if span.numel() else 0
    for j in range(1, longest):
        shifted = torch.nn.functional.pad(target_log_probs[..., j:], (0, j))
        out = out + torch.where(span > j, shifted, torch.zeros_like(shifted))
    return out


def sorted_probability_distance(
    student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, count: torch.Tensor
) -> torch.Tensor:
    """``sum_{r < count} |p_S^(r) - p_T^(r)|`` per row: the L1 distance of the two sides' ``count``
    largest probabilities, paired by rank. Both inputs ``[..., K]`` are log-probabilities in any order
    (floored entries are zero probability)."""
    student = student_log_probs.clamp_min(LOG_PROB_FLOOR).sort(dim=-1, descending=True).values.exp()
    teacher = teacher_log_probs.clamp_min(LOG_PROB_FLOOR).sort(dim=-1, descending=True).values.exp()
    ranks = torch.arange(student.shape[-1], device=student.device)
    used = ranks < count.unsqueeze(-1)
    return torch.where(used, (student - teacher).abs(), torch.zeros_like(student)).sum(dim=-1)


def student_top_log_probs_outside(
    student_logits: torch.Tensor, excluded_ids: torch.Tensor, excluded: torch.Tensor, k: int, chunk_size: int
) -> torch.Tensor:
    """The student's ``k`` largest log-probs ``[..., k]`` (full-vocabulary log-softmax) among the ids
    not in ``excluded_ids[excluded]`` of each row, in chunks of rows (memory only)."""
    vocab = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    dtype = torch.promote_types(torch.float32, student_logits.dtype)
    flat_logits = student_logits.reshape(-1, vocab)
    flat_ids = excluded_ids.reshape(-1, excluded_ids.shape[-1]).long().clamp_min(0)
    flat_excluded = excluded.reshape(-1, excluded.shape[-1])
    chunks = []
    for start in range(0, flat_logits.shape[0], chunk_size):
        logits = flat_logits[start : start + chunk_size].to(dtype)
        log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
        blocked = torch.zeros_like(logits, dtype=torch.bool).scatter(
            -1, flat_ids[start : start + chunk_size], flat_excluded[start : start + chunk_size]
        )
        values = logits.masked_fill(blocked, float("-inf")).topk(min(k, vocab), dim=-1).values - log_z
        chunks.append(values.clamp_min(LOG_PROB_FLOOR))
    if not chunks:
        return flat_logits.new_zeros((*lead, k), dtype=dtype)
    top = torch.cat(chunks)
    if top.shape[-1] < k:  # a vocabulary smaller than K: the missing ranks are zero probability
        top = torch.nn.functional.pad(top, (0, k - top.shape[-1]), value=LOG_PROB_FLOOR)
    return top.reshape(*lead, k)


def cross_tokenizer_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    span: torch.Tensor,
    target_ids: torch.Tensor,
    loss_mode: LossMode,
    settings: NPDLossConfig | None,
    uld_weight: float,
    *,
    topk: int | None = None,
    chunk_size: int = 4096,
) -> CrossTokenizerOutput:
    """The per-row loss of the module docstring.

    Args:
        student_logits: ``[..., T, V]``; row t predicts token t + 1.
        teacher_ids, teacher_log_probs: ``[..., T, K]`` (module docstring).
        span: ``[..., T]`` int.
        target_ids: ``[..., T]`` the tokens the rows predict (the sequence shifted by one).
        loss_mode, settings: the configured loss on the matched entries, as for
            :func:`~verl_npd.losses.distill.per_token_distillation_loss`.
        uld_weight: the ULD term's weight (``npd.cross_tokenizer.uld_weight``).
        topk: the teacher entries used per row, in both terms (None: all).
        chunk_size: rows per chunk where the student's log-probs are gathered: memory only.
    """
    if topk is not None:
        teacher_ids, teacher_log_probs = teacher_ids[..., :topk], teacher_log_probs[..., :topk]
    has_target = span > 0
    finite = teacher_log_probs > LOG_PROB_FLOOR
    matched = (teacher_ids != UNMATCHED) & finite & has_target.unsqueeze(-1)
    unmatched = (teacher_ids == UNMATCHED) & finite & has_target.unsqueeze(-1)
    matched_output = per_token_distillation_loss(
        student_logits,
        teacher_ids.clamp_min(0),
        teacher_log_probs,
        loss_mode,
        settings,
        target_ids,
        entry_mask=matched,
        chunk_size=chunk_size,
    )
    dtype = matched_output.loss.dtype
    count = unmatched.sum(dim=-1)
    uld = torch.zeros_like(matched_output.loss)
    if bool(count.any()):
        target_log_probs, _ = student_log_probs_at(
            student_logits, target_ids.unsqueeze(-1), chunk_size=chunk_size
        )
        continuation = span_continuation_log_probs(target_log_probs.squeeze(-1), span)
        student_top = student_top_log_probs_outside(
            student_logits, teacher_ids, matched, teacher_ids.shape[-1], chunk_size
        )
        floor = torch.full_like(teacher_log_probs, LOG_PROB_FLOOR, dtype=dtype)
        teacher_unmatched = torch.where(unmatched, teacher_log_probs.to(dtype), floor)
        uld = sorted_probability_distance(student_top + continuation.unsqueeze(-1), teacher_unmatched, count)
        uld = torch.where(has_target, uld, torch.zeros_like(uld))
    return CrossTokenizerOutput(
        loss=matched_output.loss + uld_weight * uld,
        uld=uld.detach(),
        student_topk_mass=matched_output.student_topk_mass,
        teacher_topk_mass=matched_output.teacher_topk_mass,
    )

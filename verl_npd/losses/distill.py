"""Packed-SFT distillation losses over the teacher's per-token top-k (docs/algorithm.md, "The loss").

Pure torch: no verl, no model, no process group. ``verl_registration`` adapts verl's calling
convention to these functions, which is how both NPD's trainer and verl's run them.

Notation, per token position t (the position whose *next* token is scored):

- ``K``: the teacher's top-k ids at t (the k highest-ranked tokens, as vLLM's ``prompt_logprobs``
  returns them), with log-probs ``log p_T(v)``. ``M_T = sum_{v in K} p_T(v) <= 1`` is the teacher's
  top-k mass; ``1 - M_T`` its tail mass.
- ``log p_S(v) = z_v - logsumexp(z)``: the student's full-vocabulary log-softmax of its logits ``z``,
  only ever evaluated at the ids in ``K`` (and, for the bucket tail, summed over the complement of K).
- Renormalised distributions on K: ``p~_T(v) = p_T(v) / M_T`` and ``q~_S(v) = p_S(v) / M_S`` with
  ``M_S = sum_{v in K} p_S(v)``.
- Bucket distributions on K + {tail}: ``P = (p_T(v)_{v in K}, 1 - M_T)`` and
  ``Q = (p_S(v)_{v in K}, 1 - M_S)``.

Losses, per token. All are >= 0; the KL/JSD losses are exactly 0 when the student matches the teacher
in the sense stated for each:

- ``forward_kl_topk`` (default):
    - ``renorm``: ``sum_{v in K} p~_T(v) (log p~_T(v) - log p_S(v))``: cross-entropy to the teacher's
      renormalised soft labels minus their entropy. The student is *not* renormalised, so the loss
      also pulls student mass from outside K into K. Zero iff ``p_S(v) = p~_T(v)`` on K.
    - ``bucket``: ``KL(P || Q)`` over the k + 1 buckets. Zero iff ``p_S = p_T`` on K (then the tails
      match too).
- ``reverse_kl_topk``: ``KL(q~_S || p~_T)`` (``renorm``) or ``KL(Q || P)`` (``bucket``). In ``renorm``
  mode the student is renormalised on K. Why: outside K the teacher's log-prob is unknown, and the
  un-normalised sum ``sum_{v in K} p_S (log p_S - log p~_T)`` can be lowered by moving student mass
  *out of* K, which would reward leaving the teacher's support. The cost of renormalising is that the
  student's tail mass gets no gradient; ``bucket`` mode constrains it.
- ``jsd``: generalised Jensen-Shannon divergence, with TRL's ``GKDTrainer.generalized_jsd_loss``
  convention (GKD, Agarwal et al. 2024, eq. 1): with ``M = beta * P + (1 - beta) * Q``,
  ``JSD_beta = beta * KL(P || M) + (1 - beta) * KL(Q || M)``, where P is the teacher and Q the student.
  As in TRL, the endpoints are special-cased: ``beta = 0`` *is* ``forward_kl_topk`` and ``beta = 1``
  *is* ``reverse_kl_topk`` (same tail mode). Note that the mixture formula itself tends to 0 at both
  ends (``JSD_beta ~ beta * KL(P || Q)`` as ``beta -> 0``), so the loss scale jumps at the endpoints,
  exactly as in TRL. For ``0 < beta < 1`` the mixture needs two normalised distributions on one
  support: ``renorm`` uses ``(p~_T, q~_S)`` and ``bucket`` uses ``(P, Q)``.
- ``ce``: ``-p_T(y) * log p_S(y)`` for the sampled next token y: hard-label cross-entropy weighted by
  the teacher's (un-renormalised) probability of y. verl's teacher scoring returns only the top-k
  (it drops the sampled token's log-prob when y is outside K), so ``p_T(y)`` is taken from K and is 0
  when y is not in K: such tokens get no weight.

Numerics: everything is computed in at least float32. Log-probs are floored at ``LOG_PROB_FLOOR``
(``exp`` of the floor is exactly 0 in float32 and float64), so teacher entries of ``-inf`` become
zero-probability entries and ``p * (log p - log q)`` never meets ``0 * inf``. The student's tail mass is
summed directly over the complement of K (not computed as ``1 - M_S``), which keeps it exact when it is
tiny and keeps its gradient bounded. Rows whose teacher entries are all ``-inf`` give a loss of 0.
"""

import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, get_args

import torch

LossMode = Literal["forward_kl_topk", "reverse_kl_topk", "jsd", "ce"]
TailMode = Literal["renorm", "bucket"]

LOSS_MODES: tuple[str, ...] = get_args(LossMode)
TAIL_MODES: tuple[str, ...] = get_args(TailMode)

# Far below any log-prob a model produces in float32 (about -104 underflows exp), far above the float32
# range, so that differences of floored values never overflow.
LOG_PROB_FLOOR = -1.0e4


@dataclass
class NPDLossConfig:
    """``npd.loss``: the NPD losses' settings that verl's ``distillation.distillation_loss`` has no field
    for. Which loss (``loss_mode``: ``npd_forward_kl_topk`` is ``forward_kl_topk`` here, ...), how many
    teacher entries (``topk``) and the chunk size are verl's fields, passed to
    :func:`per_token_distillation_loss` with these.

    There is deliberately no temperature: verl divides the student logits by the rollout temperature
    before the loss sees them, and the teacher's top-k log-probs arrive at temperature 1 (vLLM's
    ``prompt_logprobs`` ignore the sampling temperature). Sharpening only the student would bias the
    loss, and the teacher's top-k cannot be re-tempered exactly without its tail.
    """

    tail_mode: TailMode = field(
        default="renorm",
        metadata={
            "help": "How the mass outside the teacher's top-k is treated by the KL/JSD losses: 'renorm' "
            "renormalises the teacher's top-k to sum to 1; 'bucket' keeps the tail mass 1 - sum(p_T) as one "
            "extra bucket, compared with the student's mass outside the same top-k. Unused by 'ce'.",
            "choices": TAIL_MODES,
        },
    )
    beta: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the teacher in the 'jsd' mixture M = beta * P_teacher + (1 - beta) * Q_student "
            "(TRL GKD convention): beta = 0 is forward KL, beta = 1 is reverse KL. Unused by other modes."
        },
    )

    def __post_init__(self) -> None:
        if self.tail_mode not in TAIL_MODES:
            raise ValueError(f"npd.loss.tail_mode must be one of {TAIL_MODES}, got {self.tail_mode!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"npd.loss.beta must lie in [0, 1], got {self.beta}")


class DistillationOutput(NamedTuple):
    """Per-token outputs of :func:`per_token_distillation_loss`, all of the logits' leading shape."""

    loss: torch.Tensor
    """The per-token loss (differentiable w.r.t. the student logits)."""
    student_topk_mass: torch.Tensor
    """``M_S``: the student's probability mass on the teacher's top-k (detached diagnostic)."""
    teacher_topk_mass: torch.Tensor
    """``M_T``: the teacher's top-k mass (detached diagnostic)."""


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # float64 inputs stay float64 (tests); half precision is upcast because the sums below lose
    # too much in bfloat16.
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _floor(log_probs: torch.Tensor) -> torch.Tensor:
    return log_probs.clamp_min(LOG_PROB_FLOOR)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))``, floored; ``x >= 0`` (mass >= 1, e.g. rounding or padding rows) gives the floor.

    Uses the two-branch form of Maechler (2012) for accuracy on both sides of -log 2; the inputs of
    both branches are kept finite with ``torch.where`` so that no NaN reaches the gradient.
    """
    negative = x < 0
    x_safe = torch.where(negative, x, torch.full_like(x, -1.0))
    value = torch.where(
        x_safe > -math.log(2.0),
        torch.log(-torch.expm1(x_safe)),
        torch.log1p(-torch.exp(x_safe)),
    )
    return _floor(torch.where(negative, value, torch.full_like(value, LOG_PROB_FLOOR)))


def _renormalise(log_probs: torch.Tensor) -> torch.Tensor:
    """``log p - logsumexp(log p)`` over the last dim: the distribution restricted to the support, rescaled."""
    return log_probs - torch.logsumexp(log_probs, dim=-1, keepdim=True)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``sum_v p(v) (log p(v) - log q(v))`` over the last dim, for floored (finite) log-probs."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _teacher_valid_rows(teacher_topk_log_probs: torch.Tensor) -> torch.Tensor:
    return (teacher_topk_log_probs > LOG_PROB_FLOOR).any(dim=-1)


def _support_distributions(
    student_topk_log_probs: torch.Tensor,
    teacher_topk_log_probs: torch.Tensor,
    student_tail_log_mass: torch.Tensor | None,
    tail_mode: TailMode,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (teacher, student) log-distributions on one common support, per ``tail_mode``.

    renorm: ``(log p~_T, log q~_S)`` on K. bucket: ``(log P, log Q)`` on K + {tail}.
    """
    log_t = _floor(teacher_topk_log_probs)
    log_s = _floor(student_topk_log_probs)
    if tail_mode == "renorm":
        return _renormalise(log_t), _renormalise(log_s)
    if tail_mode == "bucket":
        if student_tail_log_mass is None:
            raise ValueError(
                "tail_mode='bucket' needs student_tail_log_mass (see student_log_probs_at(..., with_tail=True))"
            )
        teacher_tail = _log1mexp(torch.logsumexp(log_t, dim=-1))
        log_p = torch.cat([log_t, teacher_tail.unsqueeze(-1)], dim=-1)
        log_q = torch.cat([log_s, _floor(student_tail_log_mass).unsqueeze(-1)], dim=-1)
        return log_p, log_q
    raise ValueError(f"tail_mode must be one of {TAIL_MODES}, got {tail_mode!r}")


def student_log_probs_at(
    student_logits: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    with_tail: bool = False,
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Student log-probs ``log p_S(v) = z_v - logsumexp(z)`` at ``token_ids``, without a full log-softmax.

    Args:
        student_logits: ``[..., V]`` logits z.
        token_ids: ``[..., K]`` ids to evaluate (the teacher's top-k, possibly plus the sampled token).
        with_tail: also return ``log(sum_{v not in ids} p_S(v))``, the student's mass outside the ids,
            summed directly over the complement so that it stays exact when tiny and its gradient
            (``softmax over the complement - softmax``) stays bounded.
        chunk_size: tokens per chunk, bounding the float32 ``[chunk, V]`` temporaries of the forward pass;
            under autograd, what the backward needs (the float32 logits; in tail mode also their
            exponentials) is kept for every chunk, as a plain ``log_softmax`` would keep its output.

    Returns:
        ``([..., K] log-probs, [...] tail log-mass or None)`` in float32 (float64 for float64 logits).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    vocab = student_logits.shape[-1]
    lead_shape = student_logits.shape[:-1]
    dtype = _compute_dtype(student_logits)
    flat_logits = student_logits.reshape(-1, vocab)
    flat_ids = token_ids.reshape(-1, token_ids.shape[-1]).long()
    topk_chunks, tail_chunks = [], []
    for start in range(0, flat_logits.shape[0], chunk_size):
        logits = flat_logits[start : start + chunk_size].to(dtype)
        ids = flat_ids[start : start + chunk_size]
        log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
        topk_chunks.append(logits.gather(-1, ids) - log_z)
        if with_tail:
            # A detached shift is exact (any constant cancels) and keeps exp() in range for logits of
            # any magnitude.
            shift = logits.detach().amax(dim=-1, keepdim=True)
            complement = (logits - shift).exp().scatter(-1, ids, 0.0).sum(dim=-1)
            has_tail = complement > 0
            safe = torch.where(has_tail, complement, torch.ones_like(complement))
            tail = torch.log(safe) + (shift - log_z).squeeze(-1)
            tail_chunks.append(torch.where(has_tail, tail, torch.full_like(tail, LOG_PROB_FLOOR)))
    num_ids = flat_ids.shape[-1]
    if topk_chunks:
        topk = torch.cat(topk_chunks).reshape(*lead_shape, num_ids)
        tail = torch.cat(tail_chunks).reshape(lead_shape) if with_tail else None
    else:  # an empty micro-batch
        topk = flat_logits.new_zeros((*lead_shape, num_ids), dtype=dtype)
        tail = flat_logits.new_zeros(lead_shape, dtype=dtype) if with_tail else None
    return topk, tail


def teacher_log_prob_of(
    teacher_topk_ids: torch.Tensor, teacher_topk_log_probs: torch.Tensor, token_ids: torch.Tensor
) -> torch.Tensor:
    """``log p_T(y)`` for ``token_ids`` y (``[...]``), read off the teacher's top-k; the floor if y is not in it."""
    match = teacher_topk_ids == token_ids.unsqueeze(-1)
    floor = torch.full_like(teacher_topk_log_probs, LOG_PROB_FLOOR)
    log_probs = torch.where(match, _floor(teacher_topk_log_probs), floor)
    return log_probs.amax(dim=-1)


def forward_kl_topk(
    student_topk_log_probs: torch.Tensor,
    teacher_topk_log_probs: torch.Tensor,
    student_tail_log_mass: torch.Tensor | None = None,
    tail_mode: TailMode = "renorm",
) -> torch.Tensor:
    """Per-token forward KL on the teacher's top-k.

    renorm: ``sum_{v in K} p~_T(v) (log p~_T(v) - log p_S(v))`` (student not renormalised).
    bucket: ``sum_{v in K} p_T(v) (log p_T(v) - log p_S(v)) + (1 - M_T) (log(1 - M_T) - log(1 - M_S))``.

    Args:
        student_topk_log_probs: ``[..., K]`` full-vocabulary student log-probs at the teacher's ids.
        teacher_topk_log_probs: ``[..., K]`` teacher log-probs (``-inf`` allowed: zero probability).
        student_tail_log_mass: ``[...]`` ``log(1 - M_S)``; required for ``bucket``.
        tail_mode: ``"renorm"`` or ``"bucket"``.
    """
    valid = _teacher_valid_rows(teacher_topk_log_probs)
    if tail_mode == "renorm":
        log_p = _renormalise(_floor(teacher_topk_log_probs))
        loss = _kl(log_p, _floor(student_topk_log_probs))
    else:
        log_p, log_q = _support_distributions(
            student_topk_log_probs, teacher_topk_log_probs, student_tail_log_mass, tail_mode
        )
        loss = _kl(log_p, log_q)
    return torch.where(valid, loss, torch.zeros_like(loss))


def reverse_kl_topk(
    student_topk_log_probs: torch.Tensor,
    teacher_topk_log_probs: torch.Tensor,
    student_tail_log_mass: torch.Tensor | None = None,
    tail_mode: TailMode = "renorm",
) -> torch.Tensor:
    """Per-token reverse KL on the teacher's top-k: ``KL(q~_S || p~_T)`` (renorm) or ``KL(Q || P)`` (bucket).

    See the module docstring for why the student is renormalised on K in ``renorm`` mode.
    Arguments as in :func:`forward_kl_topk`.
    """
    valid = _teacher_valid_rows(teacher_topk_log_probs)
    log_p, log_q = _support_distributions(
        student_topk_log_probs, teacher_topk_log_probs, student_tail_log_mass, tail_mode
    )
    loss = _kl(log_q, log_p)
    return torch.where(valid, loss, torch.zeros_like(loss))


def generalized_jsd_topk(
    student_topk_log_probs: torch.Tensor,
    teacher_topk_log_probs: torch.Tensor,
    student_tail_log_mass: torch.Tensor | None = None,
    tail_mode: TailMode = "renorm",
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-token generalised JSD (TRL GKD convention), ``beta`` weighting the teacher.

    ``beta * KL(P || M) + (1 - beta) * KL(Q || M)`` with ``M = beta * P + (1 - beta) * Q`` for
    ``0 < beta < 1``; ``beta = 0`` returns :func:`forward_kl_topk` and ``beta = 1`` returns
    :func:`reverse_kl_topk`. Arguments as in :func:`forward_kl_topk`.
    """
    if beta == 0.0:
        return forward_kl_topk(student_topk_log_probs, teacher_topk_log_probs, student_tail_log_mass, tail_mode)
    if beta == 1.0:
        return reverse_kl_topk(student_topk_log_probs, teacher_topk_log_probs, student_tail_log_mass, tail_mode)
    valid = _teacher_valid_rows(teacher_topk_log_probs)
    log_p, log_q = _support_distributions(
        student_topk_log_probs, teacher_topk_log_probs, student_tail_log_mass, tail_mode
    )
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    loss = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    return torch.where(valid, loss, torch.zeros_like(loss))


def teacher_weighted_ce(student_token_log_probs: torch.Tensor, teacher_token_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token ``-p_T(y) * log p_S(y)`` for the sampled token y; the teacher weight carries no gradient."""
    weight = _floor(teacher_token_log_probs).detach().exp()
    return -weight * _floor(student_token_log_probs)


def per_token_distillation_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_log_probs: torch.Tensor,
    loss_mode: LossMode,
    settings: NPDLossConfig | None = None,
    target_ids: torch.Tensor | None = None,
    entry_mask: torch.Tensor | None = None,
    *,
    topk: int | None = None,
    chunk_size: int = 4096,
) -> DistillationOutput:
    """Per-token NPD loss from student logits and the teacher's top-k.

    Args:
        student_logits: ``[..., V]``; position t predicts token t + 1.
        teacher_topk_ids: ``[..., K]`` teacher top-k ids at the same positions, rank-ordered.
        teacher_topk_log_probs: ``[..., K]`` their teacher log-probs.
        loss_mode: one of :data:`LOSS_MODES`: 'forward_kl_topk' (soft-label cross-entropy on the
            teacher's top-k), 'reverse_kl_topk', 'jsd' (generalised JSD, weight ``settings.beta``) or
            'ce' (hard-label cross-entropy on the sampled token, weighted by the teacher's probability of it).
        settings: ``npd.loss`` (tail mode, beta); None: its defaults.
        target_ids: ``[...]`` the sampled next tokens; required for ``loss_mode='ce'``.
        entry_mask: ``[..., K]`` bool, the entries that take part (None: all). The loss is that of
            the kept entries alone, as if the others were not in K (their ids may be anything): the
            teacher's and the student's probabilities there are zero in every mode, and the bucket
            tail is the mass outside the kept ids. The cross-tokenizer loss leaves out the
            teacher's entries that have no student id.
        topk: use only the first ``topk`` (highest-ranked) teacher entries per token; None: every entry
            the teacher returned (verl's ``distillation_loss.topk`` decides how many that is).
        chunk_size: tokens per chunk when the student's log-probs are gathered from the logits (see
            :func:`student_log_probs_at`): memory only, never the result.

    Returns:
        :class:`DistillationOutput` of shape ``[...]``; reduce with :func:`reduce_token_loss`.
    """
    settings = settings or NPDLossConfig()
    if loss_mode not in LOSS_MODES:
        raise ValueError(f"loss_mode must be one of {LOSS_MODES}, got {loss_mode!r}")
    if topk is not None:
        if topk < 1:
            raise ValueError(f"topk must be >= 1 or None, got {topk}")
        teacher_topk_ids = teacher_topk_ids[..., :topk]
        teacher_topk_log_probs = teacher_topk_log_probs[..., :topk]
        entry_mask = None if entry_mask is None else entry_mask[..., :topk]
    if entry_mask is not None:
        # A left-out entry takes the id of its row's first kept entry: gathered twice, that id's
        # student mass stays out of the bucket tail once, as it should; its log-probs are zeroed below.
        # A row with nothing kept has a zero loss; its ids need only be valid.
        first_kept = teacher_topk_ids.gather(-1, entry_mask.long().argmax(dim=-1, keepdim=True))
        first_kept = torch.where(entry_mask.any(dim=-1, keepdim=True), first_kept, torch.zeros_like(first_kept))
        teacher_topk_ids = torch.where(entry_mask, teacher_topk_ids, first_kept)
        teacher_topk_log_probs = teacher_topk_log_probs.masked_fill(~entry_mask, float("-inf"))
    dtype = _compute_dtype(student_logits, teacher_topk_log_probs)
    teacher_topk_log_probs = teacher_topk_log_probs.to(dtype)
    num_teacher = teacher_topk_ids.shape[-1]

    if loss_mode == "ce":
        if target_ids is None:
            raise ValueError("loss_mode='ce' needs target_ids (the sampled next tokens)")
        # One gather pass serves both the loss (sampled token) and the top-k mass diagnostic.
        ids = torch.cat([teacher_topk_ids, target_ids.unsqueeze(-1).to(teacher_topk_ids.dtype)], dim=-1)
        log_probs, _ = student_log_probs_at(student_logits, ids, chunk_size=chunk_size)
        student_topk, student_target = log_probs[..., :num_teacher], log_probs[..., num_teacher]
        if entry_mask is not None:
            student_topk = student_topk.masked_fill(~entry_mask, LOG_PROB_FLOOR)
        teacher_target = teacher_log_prob_of(teacher_topk_ids, teacher_topk_log_probs, target_ids)
        loss = teacher_weighted_ce(student_target, teacher_target)
    else:
        student_topk, student_tail = student_log_probs_at(
            student_logits,
            teacher_topk_ids,
            with_tail=settings.tail_mode == "bucket",
            chunk_size=chunk_size,
        )
        if entry_mask is not None:
            student_topk = student_topk.masked_fill(~entry_mask, LOG_PROB_FLOOR)
        if loss_mode == "forward_kl_topk":
            loss = forward_kl_topk(student_topk, teacher_topk_log_probs, student_tail, settings.tail_mode)
        elif loss_mode == "reverse_kl_topk":
            loss = reverse_kl_topk(student_topk, teacher_topk_log_probs, student_tail, settings.tail_mode)
        else:
            loss = generalized_jsd_topk(
                student_topk, teacher_topk_log_probs, student_tail, settings.tail_mode, settings.beta
            )

    with torch.no_grad():
        student_mass = student_topk.exp().sum(dim=-1)
        teacher_mass = _floor(teacher_topk_log_probs).exp().sum(dim=-1)
    return DistillationOutput(loss=loss, student_topk_mass=student_mass, teacher_topk_mass=teacher_mass)


def reduce_token_loss(
    per_token_loss: torch.Tensor, loss_mask: torch.Tensor, global_num_tokens: int | torch.Tensor
) -> torch.Tensor:
    """``sum_{t in loss_mask} loss_t / global_num_tokens``.

    Dividing each micro-batch's *sum* by the token count of the whole global batch (all micro-batches,
    all data-parallel ranks) makes the summed micro-batch losses, and their gradients, equal to the
    token mean over the global batch, however the samples are split, padded or packed. Masked
    positions are removed with ``torch.where`` (not multiplied by 0) so a NaN/inf there cannot leak.
    """
    if not isinstance(global_num_tokens, torch.Tensor) and global_num_tokens <= 0:
        raise ValueError(f"global_num_tokens must be positive, got {global_num_tokens}")
    masked = torch.where(loss_mask.bool(), per_token_loss, torch.zeros_like(per_token_loss))
    return masked.sum() / global_num_tokens

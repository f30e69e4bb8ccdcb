"""IFD and Δ-IFD scores (docs/algorithm.md, "Scores"), as pure torch functions.

For a model M, a prompt x and a response y = y_1..y_N (response tokens only):

    s_M(y|x) = -(1/N) Σ_i log p_M(y_i | x, y_<i)      conditional mean token NLL
    s_M(y)   = -(1/N) Σ_i log p_M(y_i | h, y_<i)      unconditional: h = assistant header only
    IFD_M    = s_M(y|x) / s_M(y)                      a ratio of mean cross-entropies (nats)

Δ-IFD compares two models on the same response (T = teacher, B = behaviour student that wrote y,
S = current student):

    teacher_minus_behaviour (default):  Δ = IFD_T - IFD_B
    student_lag:                        Δ = IFD_S - IFD_B
    log_ratio:                          Δ = log IFD_T - log IFD_B

Where a score is undefined it is never NaN/inf: the value is a 0.0 placeholder and the sample
carries an exclusion status (``too_short``, ``nonfinite``, ``uncond_nll_zero``) that the filter
turns into a drop reason.

Where the log-probs come from: the conditional terms are already in the pipeline (the teacher's
prompt log-probs over prompt+response, the rollout's own response log-probs). Only the
unconditional terms need a forward, over "assistant header + response"; that is
:func:`unconditional_response_logprobs`, with the header from :meth:`TokenizerInfo.from_tokenizer`.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

# Per-sample statuses. The exclusions double as the filter's drop reasons.
OK = "ok"
TOO_SHORT = "too_short"
NONFINITE = "nonfinite"
UNCOND_NLL_ZERO = "uncond_nll_zero"
# When several apply, the first in this order is reported (a deterministic, most-basic-first order).
EXCLUSIONS = (TOO_SHORT, NONFINITE, UNCOND_NLL_ZERO)

MIN_SCORABLE_TOKENS = 2
"""Responses shorter than this are excluded as ``too_short``. N = 0 makes both means 0/0; N = 1
compares a single token in two contexts, typically a lone end-of-turn token, which says nothing
about how well the prompt explains a response."""

DEFAULT_MIN_UNCOND_NLL = 1e-6
"""s_M(y) below this (nats/token, i.e. a mean token probability above 0.999999) is treated as
zero: IFD would divide by ~0, so the sample is excluded as ``uncond_nll_zero``. 1e-6 is well above
float32 rounding of log-probs near 0 (~6e-8) and far below any real response's NLL."""

DELTA_IFD_MODES = ("teacher_minus_behaviour", "student_lag", "log_ratio")


class TokenNLL(NamedTuple):
    """Mean token NLL per sample, in float64, and the number of response tokens it averages."""

    nll: torch.Tensor  # [B] float64; 0.0 where num_tokens == 0
    num_tokens: torch.Tensor  # [B] int64


@dataclass(frozen=True)
class IFDScores:
    """IFD of one model over a batch of samples, with the two NLL terms it came from."""

    ifd: torch.Tensor  # [B] float64; 0.0 placeholder where status != "ok"
    nll_cond: torch.Tensor  # [B] s_M(y|x)
    nll_uncond: torch.Tensor  # [B] s_M(y)
    num_tokens: torch.Tensor  # [B] N
    status: tuple[str, ...]  # "ok" or one of EXCLUSIONS, per sample

    @property
    def valid(self) -> torch.Tensor:
        return ok_mask(self.status)


@dataclass(frozen=True)
class DeltaIFD:
    """Δ-IFD per sample: ``values`` [B] float64 (0.0 placeholder where status != "ok")."""

    mode: str
    values: torch.Tensor
    status: tuple[str, ...]
    num_tokens: torch.Tensor  # [B] response tokens, shared by every term of a sample

    @property
    def valid(self) -> torch.Tensor:
        return ok_mask(self.status)


def ok_mask(status: Sequence[str]) -> torch.Tensor:
    """[B] bool: which samples have status "ok"."""
    return torch.tensor([s == OK for s in status], dtype=torch.bool)


def mean_token_nll(logprobs: torch.Tensor, mask: torch.Tensor) -> TokenNLL:
    """s = -(1/N) Σ_i mask_i · logprob_i with N = Σ_i mask_i, per row of [B, T] inputs.

    Masked-out positions are ignored even when they hold -inf/NaN (padding often does), which is
    why this selects with ``where`` instead of multiplying by the mask (-inf · 0 = NaN). Rows with
    N = 0 get 0.0; :func:`ifd_from_nll` excludes them as ``too_short``.
    """
    if logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and mask {tuple(mask.shape)} differ in shape")
    mask = mask.bool()
    total = torch.where(mask, logprobs.double(), 0.0).sum(dim=-1)
    num_tokens = mask.sum(dim=-1)
    return TokenNLL(nll=-total / num_tokens.clamp(min=1), num_tokens=num_tokens)


def ifd_from_nll(cond: TokenNLL, uncond: TokenNLL, *, min_uncond_nll: float = DEFAULT_MIN_UNCOND_NLL) -> IFDScores:
    """IFD = s(y|x) / s(y), with a status per sample instead of NaN/inf.

    Status, first match wins: ``too_short`` (N < 2), ``nonfinite`` (either NLL not finite),
    ``uncond_nll_zero`` (s(y) < ``min_uncond_nll``), else ``ok``.
    """
    if not torch.equal(cond.num_tokens, uncond.num_tokens):
        raise ValueError(
            "conditional and unconditional terms cover different numbers of response tokens: "
            f"{cond.num_tokens.tolist()} vs {uncond.num_tokens.tolist()}"
        )
    too_short = cond.num_tokens < MIN_SCORABLE_TOKENS
    nonfinite = ~(torch.isfinite(cond.nll) & torch.isfinite(uncond.nll))
    uncond_zero = uncond.nll < min_uncond_nll
    status = _first_status([(too_short, TOO_SHORT), (nonfinite, NONFINITE), (uncond_zero, UNCOND_NLL_ZERO)])
    ok = ok_mask(status)
    ifd = torch.where(ok, cond.nll / torch.where(ok, uncond.nll, 1.0), 0.0)
    return IFDScores(ifd=ifd, nll_cond=cond.nll, nll_uncond=uncond.nll, num_tokens=cond.num_tokens, status=status)


def delta_ifd(
    mode: str,
    *,
    teacher: IFDScores | None = None,
    behaviour: IFDScores | None = None,
    student: IFDScores | None = None,
    num_tokens: torch.Tensor | None = None,
) -> DeltaIFD:
    """Δ-IFD of ``mode`` (see the module docstring) from the IFDs it needs.

    A sample's status is the first exclusion (in ``EXCLUSIONS`` order) of any IFD it uses, else
    ``nonfinite`` if Δ itself is not finite (``log_ratio`` with IFD = 0, i.e. s(y|x) = 0), else ok.

    ``num_tokens``: the response's token count when the two IFDs were computed in different
    tokenizations (a teacher with a tokenizer of its own, docs/algorithm.md "Across tokenizers"):
    each IFD is then a ratio over its own tokens, and Δ carries these counts (the trained
    tokenization's). None: both IFDs must count the same tokens.
    """
    first, second = _delta_operands(mode, teacher=teacher, behaviour=behaviour, student=student)
    if num_tokens is not None:
        if num_tokens.shape != first.num_tokens.shape:
            raise ValueError(f"num_tokens has shape {tuple(num_tokens.shape)}, the IFDs {tuple(first.num_tokens.shape)}")
    elif not torch.equal(first.num_tokens, second.num_tokens):
        raise ValueError("the two IFDs of Δ-IFD were computed over different responses (token counts differ)")
    both_ok = first.valid & second.valid
    if mode == "log_ratio":
        # Placeholder 1.0 keeps log() finite on excluded rows; they are overwritten below anyway.
        raw = torch.log(torch.where(both_ok, first.ifd, 1.0)) - torch.log(torch.where(both_ok, second.ifd, 1.0))
    else:
        raw = first.ifd - second.ifd
    inputs_status = tuple(_worst(a, b) for a, b in zip(first.status, second.status))
    status = tuple(NONFINITE if s == OK and not torch.isfinite(v) else s for s, v in zip(inputs_status, raw))
    ok = ok_mask(status)
    counts = first.num_tokens if num_tokens is None else num_tokens
    return DeltaIFD(mode=mode, values=torch.where(ok, raw, 0.0), status=status, num_tokens=counts)


def delta_ifd_operands(mode: str) -> tuple[str, str]:
    """The two IFDs that ``mode`` subtracts, as (first, second) among teacher/behaviour/student."""
    if mode not in DELTA_IFD_MODES:
        raise ValueError(f"unknown Δ-IFD mode {mode!r}; expected one of {DELTA_IFD_MODES}")
    return ("student", "behaviour") if mode == "student_lag" else ("teacher", "behaviour")


def _delta_operands(mode: str, **scores: IFDScores | None) -> tuple[IFDScores, IFDScores]:
    names = delta_ifd_operands(mode)
    missing = [name for name in names if scores[name] is None]
    if missing:
        raise ValueError(f"Δ-IFD mode {mode!r} needs the IFDs of {names}; missing: {missing}")
    return scores[names[0]], scores[names[1]]


def _first_status(checks: list[tuple[torch.Tensor, str]]) -> tuple[str, ...]:
    status = [OK] * len(checks[0][0])
    for flags, name in reversed(checks):  # later checks are overwritten by earlier ones
        for i in flags.nonzero().flatten().tolist():
            status[i] = name
    return tuple(status)


def _worst(a: str, b: str) -> str:
    """The earlier exclusion of two statuses (``ok`` only if both are ok)."""
    for name in EXCLUSIONS:
        if name in (a, b):
            return name
    return OK


# ---------------------------------------------------------------------------------------------
# The unconditional forward: "assistant header + response".
# ---------------------------------------------------------------------------------------------

_SENTINEL_USER_TURN = "NPD-SENTINEL-USER-TURN"


class ChatTemplateError(ValueError):
    """The tokenizer's chat template does not yield an assistant header we can use."""


@dataclass(frozen=True)
class TokenizerInfo:
    """What the response-alone forward needs from the tokenizer.

    ``header_ids``: the tokens that open an assistant turn (plus BOS when the template starts with
    it), e.g. ``<|im_start|>assistant\\n`` for Qwen. ``pad_token_id``: any valid id; padded
    positions are masked out of attention and never scored.
    """

    header_ids: tuple[int, ...]
    pad_token_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer, **chat_template_kwargs) -> "TokenizerInfo":
        """Derive the assistant header from the tokenizer's own chat template.

        The spec's s_M(y) "keeps the assistant header of the chat template but drops the user
        turn". We render a one-turn conversation ``[user: SENTINEL]`` twice, with and without
        ``add_generation_prompt``; the tokens the second rendering appends are exactly the header
        the model saw at generation, after the prompt (the same token-level diff verl uses in
        ``verl.utils.tokenizer.chat_template.extract_system_prompt_and_generation``, here with
        checks). For Qwen that is ``<|im_start|>assistant\\n``: the user turn, and any default
        system turn the template injects (Qwen2.5's "You are Qwen..."), are dropped with the
        prompt, because they are conditioning, not response. A BOS token that starts every
        rendering (Llama 3's ``<|begin_of_text|>``) is kept in front: the model never sees a
        sequence without it. ``chat_template_kwargs`` are passed to the template as at
        generation (verl's ``data.apply_chat_template_kwargs``, e.g. ``enable_thinking``).

        Raises :class:`ChatTemplateError` when there is no template, when the generation prompt
        is not an append-only suffix, or when it is empty.
        """
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(
                "the tokenizer has no chat template, so the assistant header for the response-alone "
                "(unconditional) IFD term cannot be derived"
            )
        conversation = [{"role": "user", "content": _SENTINEL_USER_TURN}]
        closed = render_chat_ids(tokenizer, conversation, add_generation_prompt=False, **chat_template_kwargs)
        opened = render_chat_ids(tokenizer, conversation, add_generation_prompt=True, **chat_template_kwargs)
        if opened[: len(closed)] != closed:
            raise ChatTemplateError(
                "the chat template renders the conversation differently with add_generation_prompt=True, "
                "so the assistant header is not a clean suffix and cannot be derived"
            )
        header = opened[len(closed) :]
        if not header:
            raise ChatTemplateError(
                "the chat template adds no tokens with add_generation_prompt=True, so it has no assistant "
                "header to build the response-alone (unconditional) IFD input from"
            )
        bos = tokenizer.bos_token_id
        if bos is not None and closed[0] == bos and header[0] != bos:
            header = [bos] + header
        pad = tokenizer.pad_token_id
        return cls(header_ids=tuple(header), pad_token_id=pad if pad is not None else 0)


def render_chat_ids(
    tokenizer, messages: list[dict], *, add_generation_prompt: bool, **chat_template_kwargs
) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template, as a flat list."""
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False, **chat_template_kwargs
    )
    return [int(i) for i in ids]


@torch.no_grad()
def response_logprobs(
    model: torch.nn.Module,
    contexts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p_M(y_i | c, y_<i) for every token of every response, by batched padded forwards.

    Each row is ``context + response``, right-padded with an attention mask (so positions start at
    0 in every row, as in an unpadded forward). Rows are batched longest-first to keep padding low;
    results are returned in input order. Rows with an empty response are not run and come back
    fully masked. The model should be in eval mode.

    Returns ``(logprobs, mask)``, float32 and bool of shape [B, R] with R the longest response,
    right-padded: row b holds the log-probs of ``responses[b]`` in its first ``len(responses[b])``
    positions. ``progress`` is called with the number of rows run after each batch.
    """
    if len(contexts) != len(responses):
        raise ValueError(f"{len(contexts)} contexts but {len(responses)} responses")
    if any(len(c) == 0 for c in contexts):
        raise ValueError("every context needs at least one token (the first response token is predicted from it)")
    width = max((len(r) for r in responses), default=0)
    logprobs = torch.zeros(len(responses), width, dtype=torch.float32)
    mask = torch.zeros(len(responses), width, dtype=torch.bool)
    device = next(model.parameters()).device
    # Empty responses have nothing to score: no forward (their context alone may be overlong).
    scored = [i for i in range(len(responses)) if len(responses[i])]
    order = sorted(scored, key=lambda i: -(len(contexts[i]) + len(responses[i])))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, attention_mask = _right_padded([list(contexts[i]) + list(responses[i]) for i in rows], pad_token_id)
        logits = model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
        ).logits
        for row, i in enumerate(rows):
            n_ctx, n_resp = len(contexts[i]), len(responses[i])
            # The logit at position t predicts token t+1, so response token j sits at n_ctx-1+j.
            # One row at a time keeps the float32 log-softmax at [R, V], not [batch, T, V].
            step_logits = logits[row, n_ctx - 1 : n_ctx - 1 + n_resp].float()
            targets = input_ids[row, n_ctx : n_ctx + n_resp].to(device)
            token_lp = torch.log_softmax(step_logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
            logprobs[i, :n_resp] = token_lp.cpu()
            mask[i, :n_resp] = True
        if progress is not None:
            progress(len(rows))
    return logprobs, mask


def unconditional_response_logprobs(
    model: torch.nn.Module,
    tokenizer_info: TokenizerInfo,
    responses: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p_M(y_i | h, y_<i) over "assistant header h + response" (the s_M(y) term's input).

    One batched forward per ``batch_size`` responses; same layout as :func:`response_logprobs`.
    """
    header = tokenizer_info.header_ids
    return response_logprobs(
        model,
        [header] * len(responses),
        responses,
        pad_token_id=tokenizer_info.pad_token_id,
        batch_size=batch_size,
        progress=progress,
    )


def _right_padded(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, : len(r)] = 1
    return input_ids, attention_mask

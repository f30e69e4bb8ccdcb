"""The Δ-IFD sample filter (docs/algorithm.md, "The Δ-IFD filter").

A sample is kept when its Δ-IFD lies inside a band; the extremes on either side are dropped as
out-of-distribution noise. Each sample gets exactly one reason, the first that applies:

1. ``too_short`` / ``nonfinite`` / ``uncond_nll_zero``: Δ is undefined for it (see ``ifd.py``),
   or the response has fewer than ``min_response_tokens`` tokens;
2. ``teacher_ifd_ge_1``: IFD_T >= 1 (the prompt does not help the teacher at all), if enabled;
3. ``below_band`` / ``above_band``: Δ < band low / Δ > band high;
4. ``kept``.

The band. ``absolute``: [lo, hi] as given. ``quantile``: [Q(lo), Q(hi)] where Q is the quantile of
the window's valid Δ values (every sample not excluded in step 1, before the teacher-IFD rule, so
the band does not move when that rule is switched) computed like ``numpy.quantile``'s default
"linear" method: sort the n values v_(0) <= ... <= v_(n-1), then Q(q) = v_(k) + f·(v_(k+1) - v_(k))
with k + f = q·(n-1). Both band ends are inclusive.

Determinism. A decision depends only on the sample's own values and the window's band, which is a
function of the multiset of Δ values; so equal Δ values always get equal decisions (ties are never
broken by position) and shuffling the window shuffles the decisions with it.

Small windows. With linear interpolation and lo > 0, the smallest distinct value always falls
below Q(lo) (and the largest above Q(hi)): a 2-sample window would lose both. Windows with fewer
valid samples than ``min_window`` therefore skip the quantile band (``npd/band_applied`` = 0).
"""

from dataclasses import dataclass, field

import torch

from verl_npd.filters.ifd import (
    DELTA_IFD_MODES,
    EXCLUSIONS,
    MIN_SCORABLE_TOKENS,
    OK,
    TOO_SHORT,
    DeltaIFD,
    IFDScores,
    delta_ifd,
    delta_ifd_operands,
)

KEPT = "kept"
BELOW_BAND = "below_band"
ABOVE_BAND = "above_band"
TEACHER_IFD_GE_1 = "teacher_ifd_ge_1"
DROP_REASONS = (*EXCLUSIONS, TEACHER_IFD_GE_1, BELOW_BAND, ABOVE_BAND)
BAND_TYPES = ("quantile", "absolute")
REPORTED_QUANTILES = {"p05": 0.05, "p50": 0.50, "p95": 0.95}


@dataclass
class DeltaIFDFilterConfig:
    """Configuration of the Δ-IFD filter (``npd.filter`` in the trainer config)."""

    enabled: bool = field(
        default=True,
        metadata={"help": "Filter samples. When false every sample is kept, but Δ-IFD quantiles are still reported."},
    )
    mode: str = field(
        default="teacher_minus_behaviour",
        metadata={
            "help": "Δ-IFD definition: 'teacher_minus_behaviour' (IFD_T - IFD_B), 'student_lag' "
            "(IFD_S_now - IFD_B) or 'log_ratio' (log IFD_T - log IFD_B)."
        },
    )
    band: str = field(
        default="quantile",
        metadata={
            "help": "'quantile': keep Δ within the [lo, hi] quantiles of the current scoring window; "
            "'absolute': keep lo <= Δ <= hi."
        },
    )
    lo: float = field(
        default=0.05,
        metadata={"help": "Low end of the band: a quantile in [0, 1] (band=quantile) or a Δ value (band=absolute)."},
    )
    hi: float = field(
        default=0.95,
        metadata={"help": "High end of the band: a quantile in [0, 1] (band=quantile) or a Δ value (band=absolute)."},
    )
    drop_teacher_ifd_ge_1: bool = field(
        default=False,
        metadata={"help": "Also drop samples whose teacher IFD is >= 1 (the prompt does not help the teacher)."},
    )
    min_response_tokens: int = field(
        default=MIN_SCORABLE_TOKENS,
        metadata={"help": f"Drop responses shorter than this as 'too_short' (at least {MIN_SCORABLE_TOKENS})."},
    )
    min_window: int = field(
        default=20,
        metadata={
            "help": "band=quantile only: windows with fewer valid samples than this are not band-filtered "
            "(linear quantiles always cut the extreme value of a tiny window). 20 is the smallest window "
            "in which the default 5% tails are one sample each."
        },
    )

    def __post_init__(self):
        if self.mode not in DELTA_IFD_MODES:
            raise ValueError(f"npd.filter.mode: unknown mode {self.mode!r}; expected one of {DELTA_IFD_MODES}")
        if self.band not in BAND_TYPES:
            raise ValueError(f"npd.filter.band: unknown band type {self.band!r}; expected one of {BAND_TYPES}")
        for name in ("lo", "hi"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
                raise ValueError(f"npd.filter.{name}: must be a number, got {value!r}")
            if self.band == "quantile" and not 0.0 <= value <= 1.0:
                raise ValueError(f"npd.filter.{name}: a quantile must lie in [0, 1], got {value}")
        if self.lo > self.hi:
            raise ValueError(f"npd.filter.lo ({self.lo}) must not exceed npd.filter.hi ({self.hi})")
        if self.min_response_tokens < MIN_SCORABLE_TOKENS:
            raise ValueError(
                f"npd.filter.min_response_tokens: must be >= {MIN_SCORABLE_TOKENS} (IFD of shorter responses "
                f"is undefined or meaningless), got {self.min_response_tokens}"
            )
        if self.min_window < 1:
            raise ValueError(f"npd.filter.min_window: must be >= 1, got {self.min_window}")


@dataclass(frozen=True)
class FilterDecision:
    """The filter's output for one scoring window."""

    keep: torch.Tensor  # [B] bool
    reasons: tuple[str, ...]  # "kept" or a drop reason, per sample
    delta: DeltaIFD
    band: tuple[float, float] | None  # the Δ bounds applied, None when no band was applied
    metrics: dict[str, float]


class DeltaIFDFilter:
    """The Δ-IFD filter of one config: ``DeltaIFDFilter(config)(teacher=..., behaviour=...)``."""

    def __init__(self, config: DeltaIFDFilterConfig | None = None):
        self.config = config or DeltaIFDFilterConfig()

    @property
    def required_scores(self) -> tuple[str, ...]:
        """Which IFDs (among teacher, behaviour, student) the caller must compute and pass."""
        names = delta_ifd_operands(self.config.mode)
        if self.config.drop_teacher_ifd_ge_1 and "teacher" not in names:
            names += ("teacher",)
        return names

    def __call__(
        self,
        *,
        teacher: IFDScores | None = None,
        behaviour: IFDScores | None = None,
        student: IFDScores | None = None,
        num_tokens: torch.Tensor | None = None,
    ) -> FilterDecision:
        """``num_tokens``: the responses' token counts when the IFDs were computed in different
        tokenizations (:func:`verl_npd.filters.ifd.delta_ifd`)."""
        delta = delta_ifd(self.config.mode, teacher=teacher, behaviour=behaviour, student=student, num_tokens=num_tokens)
        return filter_delta_ifd(self.config, delta, teacher_ifd=teacher)


def filter_delta_ifd(
    config: DeltaIFDFilterConfig, delta: DeltaIFD, teacher_ifd: IFDScores | None = None
) -> FilterDecision:
    """Keep/drop decisions, one reason per sample, and the ``npd/*`` metrics (module docstring)."""
    excluded = _exclusions(delta, config.min_response_tokens)
    valid = torch.tensor([r is None for r in excluded], dtype=torch.bool)
    valid_values = delta.values[valid]
    band = _band(config, valid_values) if config.enabled else None
    if not config.enabled:
        reasons = (KEPT,) * len(excluded)
    else:
        teacher_ge_1 = _teacher_ifd_ge_1(config, teacher_ifd, len(excluded))
        reasons = tuple(
            _reason(excl, bool(t_ge_1), float(v), band)
            for excl, t_ge_1, v in zip(excluded, teacher_ge_1, delta.values)
        )
    keep = torch.tensor([r == KEPT for r in reasons], dtype=torch.bool)
    return FilterDecision(
        keep=keep, reasons=reasons, delta=delta, band=band, metrics=_metrics(reasons, valid_values, band)
    )


def _exclusions(delta: DeltaIFD, min_response_tokens: int) -> list[str | None]:
    """The step-1 reason of each sample, or None where Δ is usable."""
    return [
        status if status != OK else (TOO_SHORT if int(n) < min_response_tokens else None)
        for status, n in zip(delta.status, delta.num_tokens)
    ]


def _band(config: DeltaIFDFilterConfig, valid_values: torch.Tensor) -> tuple[float, float] | None:
    if config.band == "absolute":
        return (float(config.lo), float(config.hi))
    if len(valid_values) < config.min_window:
        return None
    lo, hi = _quantiles(valid_values, [config.lo, config.hi])
    return (lo, hi)


def _teacher_ifd_ge_1(config: DeltaIFDFilterConfig, teacher_ifd: IFDScores | None, n: int) -> list[bool]:
    if not config.drop_teacher_ifd_ge_1:
        return [False] * n
    if teacher_ifd is None:
        raise ValueError("npd.filter.drop_teacher_ifd_ge_1 needs the teacher's IFD scores (teacher=...)")
    return (teacher_ifd.valid & (teacher_ifd.ifd >= 1.0)).tolist()


def _reason(excluded: str | None, teacher_ge_1: bool, value: float, band: tuple[float, float] | None) -> str:
    if excluded is not None:
        return excluded
    if teacher_ge_1:
        return TEACHER_IFD_GE_1
    if band is not None and value < band[0]:
        return BELOW_BAND
    if band is not None and value > band[1]:
        return ABOVE_BAND
    return KEPT


def _quantiles(values: torch.Tensor, qs: list[float]) -> list[float]:
    """numpy-compatible linear-interpolation quantiles, in float64 so they match numpy exactly."""
    return torch.quantile(values.double(), torch.tensor(qs, dtype=torch.float64), interpolation="linear").tolist()


def _metrics(reasons: tuple[str, ...], valid_values: torch.Tensor, band: tuple[float, float] | None) -> dict[str, float]:
    """The spec's ``npd/*`` names. Quantile metrics are omitted when no sample has a valid Δ
    (a logged 0 would look like a measurement); an empty window reports kept_fraction 0."""
    n = len(reasons)
    metrics = {"npd/kept_fraction": reasons.count(KEPT) / n if n else 0.0}
    if len(valid_values):
        quantiles = _quantiles(valid_values, list(REPORTED_QUANTILES.values()))
        metrics.update({f"npd/delta_ifd_{name}": q for name, q in zip(REPORTED_QUANTILES, quantiles)})
    metrics.update({f"npd/drop/{reason}": float(reasons.count(reason)) for reason in DROP_REASONS})
    metrics["npd/band_applied"] = float(band is not None)
    if band is not None:
        metrics["npd/band_lo"], metrics["npd/band_hi"] = band
    return metrics

"""The Δ-IFD filter: band arithmetic against numpy by hand, reasons, metrics, config validation."""

import numpy as np
import pytest
import torch

from verl_npd.filters.delta_ifd import DeltaIFDFilter, DeltaIFDFilterConfig, filter_delta_ifd
from verl_npd.filters.ifd import DeltaIFD, TokenNLL, ifd_from_nll
from verl_npd.trainer.config import NPDConfig


def window(values, status=None, num_tokens=None) -> DeltaIFD:
    n = len(values)
    return DeltaIFD(
        mode="teacher_minus_behaviour",
        values=torch.tensor(values, dtype=torch.float64),
        status=tuple(status or ["ok"] * n),
        num_tokens=torch.tensor(num_tokens or [10] * n),
    )


def run(values, **config):
    return filter_delta_ifd(DeltaIFDFilterConfig(**config), window(values))


# --- quantile band ------------------------------------------------------------------------


def test_quantile_band_on_0_to_99_matches_numpy_and_keeps_exactly_90():
    values = np.random.default_rng(0).permutation(100).astype(float)
    decision = run(values.tolist())
    lo, hi = np.quantile(values, [0.05, 0.95])  # 4.95 and 94.05: linear between ranks 4/5 and 94/95
    assert (lo, hi) == pytest.approx((4.95, 94.05))
    assert decision.band == pytest.approx((lo, hi))
    assert decision.keep.tolist() == [5 <= v <= 94 for v in values]
    assert decision.reasons == tuple("below_band" if v < 5 else "above_band" if v > 94 else "kept" for v in values)
    m = decision.metrics
    assert m["npd/kept_fraction"] == 0.9
    assert (m["npd/drop/below_band"], m["npd/drop/above_band"]) == (5, 5)
    assert [m["npd/delta_ifd_p05"], m["npd/delta_ifd_p50"], m["npd/delta_ifd_p95"]] == pytest.approx(
        np.quantile(values, [0.05, 0.5, 0.95]).tolist()
    )
    assert (m["npd/band_lo"], m["npd/band_hi"], m["npd/band_applied"]) == pytest.approx((lo, hi, 1.0))


def test_quantile_band_on_arbitrary_values_matches_numpy():
    values = np.random.default_rng(1).normal(size=257)
    decision = run(values.tolist(), lo=0.1, hi=0.8)
    lo, hi = np.quantile(values, [0.1, 0.8])
    assert decision.keep.tolist() == ((values >= lo) & (values <= hi)).tolist()
    assert decision.metrics["npd/kept_fraction"] == pytest.approx(((values >= lo) & (values <= hi)).mean())


def test_ties_get_equal_decisions_and_band_ends_are_inclusive():
    values = [0.0] * 3 + [1.0] * 94 + [2.0] * 3
    decision = run(values)
    assert decision.band == (1.0, 1.0)  # rank 4.95 and 94.05 both land inside the run of 1.0s
    assert decision.reasons == ("below_band",) * 3 + ("kept",) * 94 + ("above_band",) * 3
    # Ties straddling a quantile position are all kept together, none cut by position.
    decision = run([0.0] * 10 + [1.0] * 80 + [2.0] * 10)
    assert decision.keep.all()


def test_all_equal_values_are_all_kept():
    decision = run([3.0] * 50)
    assert decision.keep.all() and decision.band == (3.0, 3.0)
    assert [decision.metrics[f"npd/delta_ifd_{p}"] for p in ("p05", "p50", "p95")] == [3.0, 3.0, 3.0]


def test_tiny_windows():
    one = run([0.7])
    assert one.keep.tolist() == [True] and one.band is None and one.metrics["npd/delta_ifd_p50"] == 0.7
    two = run([0.1, 0.9])
    assert two.keep.tolist() == [True, True] and two.metrics["npd/band_applied"] == 0.0
    # With the window guard off, linear quantiles of two values cut both (why min_window exists).
    two_unguarded = run([0.1, 0.9], min_window=1)
    assert two_unguarded.band == pytest.approx((0.14, 0.86))
    assert two_unguarded.reasons == ("below_band", "above_band")
    assert run([0.7], min_window=1).keep.tolist() == [True]
    empty = run([])
    assert empty.keep.tolist() == [] and empty.metrics["npd/kept_fraction"] == 0.0
    assert "npd/delta_ifd_p50" not in empty.metrics


def test_min_window_counts_valid_samples_only():
    values = list(range(20))
    status = ["ok"] * 19 + ["nonfinite"]
    decision = filter_delta_ifd(DeltaIFDFilterConfig(), window(values, status))
    assert decision.band is None and decision.reasons[-1] == "nonfinite"
    assert decision.keep.tolist() == [True] * 19 + [False]


# --- absolute band, exclusions, teacher rule, disabled -----------------------------------------


def test_absolute_band_is_inclusive():
    decision = run([-2.0, -1.0, 0.0, 1.0, 2.0], band="absolute", lo=-1.0, hi=1.0)
    assert decision.reasons == ("below_band", "kept", "kept", "kept", "above_band")
    assert decision.band == (-1.0, 1.0)


def test_excluded_samples_have_their_reason_and_stay_out_of_the_quantiles():
    values = [float(v) for v in range(24)] + [1000.0, -1000.0, 0.0]
    status = ["ok"] * 24 + ["nonfinite", "uncond_nll_zero", "too_short"]
    num_tokens = [10] * 23 + [3] + [10, 10, 1]
    decision = filter_delta_ifd(DeltaIFDFilterConfig(min_response_tokens=4), window(values, status, num_tokens))
    assert decision.reasons[23:] == ("too_short", "nonfinite", "uncond_nll_zero", "too_short")
    valid = np.arange(23, dtype=float)
    assert decision.band == pytest.approx(tuple(np.quantile(valid, [0.05, 0.95])))
    assert decision.metrics["npd/delta_ifd_p95"] == pytest.approx(np.quantile(valid, 0.95))
    m = decision.metrics
    assert (m["npd/drop/too_short"], m["npd/drop/nonfinite"], m["npd/drop/uncond_nll_zero"]) == (2, 1, 1)
    assert m["npd/kept_fraction"] == pytest.approx(decision.keep.sum().item() / 27)


def ifd_scores(ifd_values, tokens=10):
    """IFDScores with exactly these IFDs (s(y) = 1, s(y|x) = IFD)."""
    n = len(ifd_values)
    return ifd_from_nll(
        TokenNLL(torch.tensor(ifd_values, dtype=torch.float64), torch.full((n,), tokens)),
        TokenNLL(torch.ones(n, dtype=torch.float64), torch.full((n,), tokens)),
    )


def test_teacher_ifd_ge_1_rule():
    teacher, behaviour = ifd_scores([0.5, 1.0, 1.2, 0.9]), ifd_scores([0.4, 0.4, 0.4, 0.4])
    wide = {"band": "absolute", "lo": -10.0, "hi": 10.0}
    assert DeltaIFDFilter(DeltaIFDFilterConfig(**wide))(teacher=teacher, behaviour=behaviour).keep.all()
    decision = DeltaIFDFilter(DeltaIFDFilterConfig(**wide, drop_teacher_ifd_ge_1=True))(teacher=teacher, behaviour=behaviour)
    assert decision.reasons == ("kept", "teacher_ifd_ge_1", "teacher_ifd_ge_1", "kept")
    assert decision.metrics["npd/drop/teacher_ifd_ge_1"] == 2
    assert decision.delta.values.tolist() == pytest.approx([0.1, 0.6, 0.8, 0.5])


def test_teacher_rule_does_not_move_the_quantile_band():
    teacher = ifd_scores(np.linspace(0.5, 1.5, 40).tolist())
    behaviour = ifd_scores([0.7] * 40)
    off = DeltaIFDFilter()(teacher=teacher, behaviour=behaviour)
    on = DeltaIFDFilter(DeltaIFDFilterConfig(drop_teacher_ifd_ge_1=True))(teacher=teacher, behaviour=behaviour)
    assert on.band == off.band
    assert on.metrics["npd/drop/teacher_ifd_ge_1"] > 0


def test_required_scores_and_missing_teacher():
    assert DeltaIFDFilter().required_scores == ("teacher", "behaviour")
    lag = DeltaIFDFilter(DeltaIFDFilterConfig(mode="student_lag", drop_teacher_ifd_ge_1=True))
    assert lag.required_scores == ("student", "behaviour", "teacher")
    with pytest.raises(ValueError, match="drop_teacher_ifd_ge_1 needs the teacher"):
        lag(student=ifd_scores([0.5]), behaviour=ifd_scores([0.5]))


def test_disabled_filter_keeps_everything_but_reports_quantiles():
    values = np.random.default_rng(2).permutation(100).astype(float)
    status = ["ok"] * 99 + ["too_short"]
    decision = filter_delta_ifd(DeltaIFDFilterConfig(enabled=False), window(values.tolist(), status))
    assert decision.keep.all() and set(decision.reasons) == {"kept"} and decision.band is None
    m = decision.metrics
    assert m["npd/kept_fraction"] == 1.0 and m["npd/band_applied"] == 0.0
    assert all(v == 0 for k, v in m.items() if k.startswith("npd/drop/"))
    assert m["npd/delta_ifd_p05"] == pytest.approx(np.quantile(values[:99], 0.05))


# --- determinism --------------------------------------------------------------------------


def test_same_input_twice_and_shuffled_input_give_the_same_decisions():
    rng = np.random.default_rng(3)
    values = np.round(rng.normal(size=200), 1)  # rounding makes many ties
    first, second = run(values.tolist()), run(values.tolist())
    assert first.reasons == second.reasons and first.metrics == second.metrics
    perm = rng.permutation(200)
    shuffled = run(values[perm].tolist())
    assert shuffled.reasons == tuple(first.reasons[i] for i in perm)
    assert shuffled.metrics == first.metrics


# --- config validation names the field ------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"lo": 0.9, "hi": 0.1}, "npd.filter.lo"),
        ({"hi": 1.5}, "npd.filter.hi"),
        ({"lo": -0.1}, "npd.filter.lo"),
        ({"lo": float("nan")}, "npd.filter.lo"),
        ({"band": "absolute", "lo": 3.0, "hi": -3.0}, "npd.filter.lo"),
        ({"mode": "kl"}, "npd.filter.mode"),
        ({"band": "sigma"}, "npd.filter.band"),
        ({"min_response_tokens": 1}, "npd.filter.min_response_tokens"),
        ({"min_window": 0}, "npd.filter.min_window"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        DeltaIFDFilterConfig(**kwargs)


def test_absolute_bounds_may_lie_outside_0_1_and_unknown_keys_are_named():
    assert DeltaIFDFilterConfig(band="absolute", lo=-5.0, hi=5.0).hi == 5.0
    with pytest.raises(ValueError, match=r"npd\.filter: unknown field\(s\) \['threshold'\]"):
        NPDConfig.from_mapping({"filter": {"threshold": 1.0}})
    assert NPDConfig.from_mapping({"filter": {"enabled": False, "lo": 0.1}}).filter == DeltaIFDFilterConfig(
        enabled=False, lo=0.1
    )

"""Tests of verl_npd.losses.distill and its verl registration.

Every expected number comes from an independent float64 formula written out below with Python
``math`` and explicit loops (never from the code under test), or from a mathematical property
(zero at the matching distribution, descent towards the teacher, split invariance).
"""

import json
import math
import random

import pytest
import torch

from verl_npd.losses.distill import (
    NPDLossConfig,
    forward_kl_topk,
    per_token_distillation_loss,
    reduce_token_loss,
    student_log_probs_at,
)

VOCAB, TOPK = 12, 4
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
DIVERGENCES = [("forward_kl_topk", 0.5), ("reverse_kl_topk", 0.5)] + [("jsd", beta) for beta in BETAS]


# ----------------------------------------------------------------------------------------------
# Independent float64 reference, one token at a time.
# ----------------------------------------------------------------------------------------------
def ref_softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


def ref_kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def ref_token_loss(mode, tail, beta, student_logits, teacher_ids, teacher_log_probs, target=None) -> float:
    """The loss of one token, straight from the definitions in docs/algorithm.md / the distill docstring."""
    p_s = ref_softmax(student_logits)
    p_t = [math.exp(lp) for lp in teacher_log_probs]
    m_t = sum(p_t)
    s_topk = [p_s[v] for v in teacher_ids]
    m_s = sum(s_topk)
    if mode == "ce":
        weight = sum(p for v, p in zip(teacher_ids, p_t) if v == target)
        return -weight * math.log(p_s[target])
    if tail == "renorm":
        teacher = [p / m_t for p in p_t]
        student = [q / m_s for q in s_topk]
    else:
        teacher = p_t + [1.0 - m_t]
        student = s_topk + [1.0 - m_s]
    if mode == "forward_kl_topk" or (mode == "jsd" and beta == 0.0):
        if tail == "renorm":  # the student is NOT renormalised here: cross-entropy to soft labels
            return sum(t * (math.log(t) - math.log(q)) for t, q in zip(teacher, s_topk) if t > 0)
        return ref_kl(teacher, student)
    if mode == "reverse_kl_topk" or (mode == "jsd" and beta == 1.0):
        return ref_kl(student, teacher)
    mixture = [beta * t + (1.0 - beta) * s for t, s in zip(teacher, student)]
    return beta * ref_kl(teacher, mixture) + (1.0 - beta) * ref_kl(student, mixture)


def make_case(seed: int, shape=(3, 5), scale: float = 2.0, dtype=torch.float32):
    """Random student logits, a teacher top-k taken from a full teacher distribution, and targets."""
    gen = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(*shape, VOCAB, generator=gen, dtype=torch.float64)).to(dtype)
    teacher_logits = scale * torch.randn(*shape, VOCAB, generator=gen, dtype=torch.float64)
    teacher_lp_full = torch.log_softmax(teacher_logits, dim=-1)
    teacher_lp, teacher_ids = teacher_lp_full.topk(TOPK, dim=-1)
    # Half of the targets inside the teacher's top-k, half anywhere (mostly outside).
    anywhere = torch.randint(0, VOCAB, shape, generator=gen)
    inside = teacher_ids.gather(-1, torch.randint(0, TOPK, (*shape, 1), generator=gen)).squeeze(-1)
    pick = torch.rand(shape, generator=gen) < 0.5
    targets = torch.where(pick, inside, anywhere)
    return student, teacher_ids, teacher_lp.to(dtype), teacher_logits, targets


def reference_losses(mode, tail, beta, student, teacher_ids, teacher_lp, targets) -> torch.Tensor:
    out = torch.empty(student.shape[:-1], dtype=torch.float64)
    for index in range(out.numel()):
        pos = torch.unravel_index(torch.tensor(index), out.shape)
        out[pos] = ref_token_loss(
            mode,
            tail,
            beta,
            student[pos].double().tolist(),
            teacher_ids[pos].tolist(),
            teacher_lp[pos].double().tolist(),
            int(targets[pos]),
        )
    return out


def run(mode, tail, beta, student, teacher_ids, teacher_lp, targets=None):
    settings = NPDLossConfig(tail_mode=tail, beta=beta)
    return per_token_distillation_loss(student, teacher_ids, teacher_lp, mode, settings, targets, chunk_size=4).loss  # several chunks


ALL_CASES = [(mode, tail, beta) for mode, beta in DIVERGENCES for tail in ("renorm", "bucket")]
ALL_CASES.append(("ce", "renorm", 0.5))


# ----------------------------------------------------------------------------------------------
# Values and gradients against the reference
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,tail,beta", ALL_CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-11)])
def test_loss_matches_float64_reference(mode, tail, beta, dtype, tol):
    for seed in range(3):
        student, ids, teacher_lp, _, targets = make_case(seed, dtype=dtype)
        got = run(mode, tail, beta, student, ids, teacher_lp, targets)
        expected = reference_losses(mode, tail, beta, student, ids, teacher_lp, targets)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode,tail,beta", ALL_CASES)
def test_gradient_matches_finite_differences_of_reference(mode, tail, beta):
    student, ids, teacher_lp, _, targets = make_case(7, shape=(2,), dtype=torch.float64)
    student.requires_grad_(True)
    run(mode, tail, beta, student, ids, teacher_lp, targets).sum().backward()
    eps = 1e-6
    for row in range(2):
        for v in range(VOCAB):
            plus, minus = student.detach()[row].tolist(), student.detach()[row].tolist()
            plus[v] += eps
            minus[v] -= eps
            args = (ids[row].tolist(), teacher_lp[row].tolist(), int(targets[row]))
            up, down = ref_token_loss(mode, tail, beta, plus, *args), ref_token_loss(mode, tail, beta, minus, *args)
            numeric = (up - down) / (2 * eps)
            assert student.grad[row, v].item() == pytest.approx(numeric, abs=1e-7), (row, v)


def test_forward_kl_renorm_gradient_is_student_minus_renormalised_teacher():
    # d/dz_v sum_K p~_T (log p~_T - z_v + logsumexp z) = p_S(v) - p~_T(v) (0 outside K for p~_T).
    student, ids, teacher_lp, _, _ = make_case(3, shape=(4,), dtype=torch.float64)
    student.requires_grad_(True)
    run("forward_kl_topk", "renorm", 0.5, student, ids, teacher_lp).sum().backward()
    for row in range(4):
        p_s = ref_softmax(student.detach()[row].tolist())
        p_t = [math.exp(lp) for lp in teacher_lp[row].tolist()]
        expected = list(p_s)
        for v, p in zip(ids[row].tolist(), p_t):
            expected[v] -= p / sum(p_t)
        torch.testing.assert_close(student.grad[row], torch.tensor(expected, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# Zero at the matching student, descent towards the teacher
# ----------------------------------------------------------------------------------------------
def matching_student_on_topk(ids, teacher_lp, rest: torch.Tensor) -> torch.Tensor:
    """Student logits equal to the teacher's log-probs on K (up to a constant), ``rest`` elsewhere."""
    return rest.clone().scatter(-1, ids, teacher_lp.to(rest.dtype) + 3.0)


@pytest.mark.parametrize("mode,beta", DIVERGENCES)
def test_zero_when_student_matches_teacher(mode, beta):
    _, ids, teacher_lp, teacher_logits, _ = make_case(11)
    # bucket: the student IS the teacher (its full distribution), so top-k and tail match.
    student = teacher_logits.float().requires_grad_(True)
    loss = run(mode, "bucket", beta, student, ids, teacher_lp)
    assert loss.abs().max().item() < 1e-6
    loss.sum().backward()
    assert student.grad.abs().max().item() < 1e-5

    # renorm: only the shape on K must match. The forward KL's student is not renormalised, so its
    # tail must be empty (-inf logits); the reverse KL / JSD renormalise the student, any tail works.
    forward = mode == "forward_kl_topk" or beta == 0.0
    tail_logits = torch.full_like(student, float("-inf")) if forward else torch.randn_like(student)
    student = matching_student_on_topk(ids, teacher_lp, tail_logits.detach()).requires_grad_(True)
    loss = run(mode, "renorm", beta, student, ids, teacher_lp)
    assert loss.abs().max().item() < 1e-6
    loss.sum().backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().max().item() < 1e-5


def _towards_zero_loss(student, ids, teacher_lp, teacher_logits, tail):
    """Direction from the student to logits at which the loss is (about) 0.

    bucket: the teacher's full distribution. renorm: only the teacher's shape on K, with (nearly) no
    student mass outside K (needed by the forward KL, irrelevant to the renormalised reverse KL / JSD).
    """
    if tail == "bucket":
        return teacher_logits - student
    return matching_student_on_topk(ids, teacher_lp, torch.full_like(student, -30.0)) - student


# Where moving the logits straight towards the teacher is downhill. For the renorm forward and reverse
# KL it is a theorem: they depend on a softmax restricted to K, the segment is a geometric
# (exponential-family) path to their minimiser, the forward KL is convex in the logits and the reverse
# KL has d/da = -(1 - a) Var <= 0. For the renorm JSD and the forward bucket KL it held for every one of
# 3000 random tokens (the forward bucket KL's exact gradient is also tested in closed form below). The
# bucket reverse KL / JSD compare *coarsened* distributions, for which the straight path is not always
# downhill (15 of 3000 random tokens were not), so they get the gradient-step check only.
STRAIGHT_PATH_DOWNHILL = [
    (mode, tail, beta)
    for mode, tail, beta in ALL_CASES
    if mode != "ce" and (tail == "renorm" or mode == "forward_kl_topk")
]


@pytest.mark.parametrize("mode,tail,beta", STRAIGHT_PATH_DOWNHILL)
def test_moving_towards_teacher_reduces_loss(mode, tail, beta):
    for seed in range(5):
        student, ids, teacher_lp, teacher_logits, _ = make_case(100 + seed, dtype=torch.float64)
        towards = _towards_zero_loss(student, ids, teacher_lp, teacher_logits, tail)
        student.requires_grad_(True)
        loss = run(mode, tail, beta, student, ids, teacher_lp)
        loss.sum().backward()
        # Every token's directional derivative towards the teacher is negative, and a small step lowers it.
        assert ((student.grad * towards).sum(dim=-1) < 0).all()
        with torch.no_grad():
            assert (run(mode, tail, beta, student + 1e-3 * towards, ids, teacher_lp) < loss).all()


@pytest.mark.parametrize("mode,tail,beta", ALL_CASES)
def test_gradient_step_reduces_every_token_loss(mode, tail, beta):
    student, ids, teacher_lp, _, targets = make_case(200, dtype=torch.float64)
    student.requires_grad_(True)
    loss = run(mode, tail, beta, student, ids, teacher_lp, targets)
    loss.sum().backward()
    with torch.no_grad():
        stepped = run(mode, tail, beta, student - 1e-2 * student.grad, ids, teacher_lp, targets)
    # ce tokens outside the teacher's top-k have weight 0: no loss to reduce.
    assert (stepped[loss > 0] < loss[loss > 0]).all() and (stepped <= loss).all()


def test_forward_kl_bucket_gradient_closed_form():
    # On K: p_S(v) - p_T(v). Outside K: p_S(u) (1 - T_tail / S_tail). Raising a top-k logit lowers the
    # loss exactly when the student gives that token less than the teacher does.
    student, ids, teacher_lp, _, _ = make_case(13, shape=(4,), dtype=torch.float64)
    student.requires_grad_(True)
    run("forward_kl_topk", "bucket", 0.5, student, ids, teacher_lp).sum().backward()
    for row in range(4):
        p_s = ref_softmax(student.detach()[row].tolist())
        top = dict(zip(ids[row].tolist(), (math.exp(lp) for lp in teacher_lp[row].tolist())))
        t_tail = 1.0 - sum(top.values())
        s_tail = 1.0 - sum(p_s[v] for v in top)
        expected = [p_s[v] - top[v] if v in top else p_s[v] * (1.0 - t_tail / s_tail) for v in range(VOCAB)]
        torch.testing.assert_close(student.grad[row], torch.tensor(expected, dtype=torch.float64))


def test_ce_gradient_raises_the_sampled_token_when_teacher_likes_it():
    student, ids, teacher_lp, _, _ = make_case(5, dtype=torch.float64)
    targets = ids[..., 1]  # inside the top-k: positive teacher weight
    student.requires_grad_(True)
    run("ce", "renorm", 0.5, student, ids, teacher_lp, targets).sum().backward()
    assert (student.grad.gather(-1, targets.unsqueeze(-1)) < 0).all()
    # A token outside the teacher's top-k carries no weight, hence no loss and no gradient.
    outside = torch.tensor([[v for v in range(VOCAB) if v not in row][0] for row in ids.reshape(-1, TOPK).tolist()])
    student.grad = None
    loss = run("ce", "renorm", 0.5, student, ids, teacher_lp, outside.reshape(targets.shape))
    loss.sum().backward()
    assert loss.abs().max().item() == 0.0 and student.grad.abs().max().item() == 0.0


# ----------------------------------------------------------------------------------------------
# Numerical stability
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,tail,beta", ALL_CASES)
def test_finite_with_neg_inf_teacher_entries_and_extreme_logits(mode, tail, beta):
    student, ids, teacher_lp, _, targets = make_case(21, shape=(6,))
    teacher_lp = teacher_lp.clone()
    teacher_lp[0, 2:] = float("-inf")  # some entries impossible
    teacher_lp[1, :] = float("-inf")  # a whole row impossible (padding)
    teacher_lp[2, :] = 0.0  # verl's padding rows: log-prob 0 everywhere, "mass" K > 1
    teacher_lp[3, 0] = -1e-9  # nearly all teacher mass on one token: tail ~ 1e-9
    student = student.clone()
    student[0] *= 1e4  # extreme logits
    student[3] = 1e30 * torch.sign(student[3])
    student[4, ids[4, 0]] = float("-inf")  # the student rules out a teacher top-1 token
    student[5] = 0.0
    student[5, ids[5, 0]] = 200.0  # all student mass on one token: tail underflows to 0
    student.requires_grad_(True)
    loss = run(mode, tail, beta, student, ids, teacher_lp, targets)
    loss.sum().backward()
    assert torch.isfinite(loss).all(), loss
    assert torch.isfinite(student.grad).all()
    assert loss[1].item() == 0.0 and student.grad[1].abs().max().item() == 0.0
    assert (loss >= -1e-6).all()


@pytest.mark.parametrize("mode,tail,beta", ALL_CASES)
def test_neg_inf_teacher_entries_are_zero_probability_entries(mode, tail, beta):
    student, ids, teacher_lp, _, targets = make_case(31, shape=(4,), dtype=torch.float64)
    teacher_lp = teacher_lp.clone()
    teacher_lp[:, 3] = float("-inf")
    got = run(mode, tail, beta, student, ids, teacher_lp, targets)
    reverse = mode == "reverse_kl_topk" or (mode == "jsd" and beta == 1.0)
    for row in range(4):
        args = (student[row].tolist(), ids[row].tolist(), teacher_lp[row].tolist(), int(targets[row]))
        if reverse:
            # The student has mass on a token the teacher rules out: the true reverse KL is +inf; the
            # floor turns it into a large, finite penalty.
            assert math.isfinite(got[row].item()) and got[row].item() > 1.0
        else:
            assert got[row].item() == pytest.approx(ref_token_loss(mode, tail, beta, *args), rel=1e-10)
    if (mode, tail) == ("forward_kl_topk", "renorm"):
        # ... and there a -inf entry is exactly an absent entry.
        for row in range(4):
            kept = (ids[row, :3].tolist(), teacher_lp[row, :3].tolist())
            absent = ref_token_loss(mode, tail, beta, student[row].tolist(), *kept)
            assert got[row].item() == pytest.approx(absent, rel=1e-10)


def test_student_tail_is_exact_when_tiny():
    # 1 - sum(top-k) would round to 0 in float32; the complement sum keeps ~1e-20.
    logits = torch.tensor([[50.0, 50.0, 0.0, 0.0]])
    _, tail = student_log_probs_at(logits, torch.tensor([[0, 1]]), with_tail=True)
    expected = math.log(2 * math.exp(-50.0) / (2 + 2 * math.exp(-50.0)))
    assert tail.item() == pytest.approx(expected, rel=1e-6)


def test_bucket_mode_requires_student_tail():
    with pytest.raises(ValueError, match="student_tail_log_mass"):
        forward_kl_topk(torch.zeros(2, 3), torch.zeros(2, 3), None, "bucket")


@pytest.mark.parametrize(
    "kwargs, message",
    [({"tail_mode": "drop"}, "npd.loss.tail_mode must be one of"), ({"beta": 1.5}, r"npd.loss.beta must lie in \[0, 1\]")],
)
def test_config_validation_names_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NPDLossConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"loss_mode": "kl"}, "loss_mode must be one of"), ({"topk": 0}, "topk must be >= 1"), ({"chunk_size": 0}, "chunk_size must be >= 1")],
)
def test_loss_arguments_are_checked(kwargs, message):
    student, ids, teacher_lp, _, _ = make_case(41, dtype=torch.float64)
    arguments = {"loss_mode": "forward_kl_topk", **kwargs}
    with pytest.raises(ValueError, match=message):
        per_token_distillation_loss(student, ids, teacher_lp, arguments.pop("loss_mode"), **arguments)


def test_topk_uses_the_first_entries():
    student, ids, teacher_lp, _, _ = make_case(41, dtype=torch.float64)
    got = per_token_distillation_loss(student, ids, teacher_lp, "forward_kl_topk", topk=2).loss
    expected = per_token_distillation_loss(student, ids[..., :2], teacher_lp[..., :2], "forward_kl_topk").loss
    torch.testing.assert_close(got, expected)


# ----------------------------------------------------------------------------------------------
# Global-batch normalisation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,tail", [("forward_kl_topk", "renorm"), ("jsd", "bucket"), ("ce", "renorm")])
def test_micro_batches_sum_to_the_global_batch(mode, tail):
    torch.manual_seed(0)
    hidden = torch.randn(10, 7, 16, dtype=torch.float64)  # 10 samples x 7 positions
    head = torch.nn.Linear(16, VOCAB, dtype=torch.float64)
    _, ids, teacher_lp, _, targets = make_case(51, shape=(10, 7), dtype=torch.float64)
    mask = torch.rand(10, 7) < 0.6
    global_tokens = int(mask.sum())
    settings = NPDLossConfig(tail_mode=tail)

    def step(rows):
        loss = per_token_distillation_loss(head(hidden[rows]), ids[rows], teacher_lp[rows], mode, settings, targets[rows]).loss
        return reduce_token_loss(loss, mask[rows], global_tokens)

    full = step(slice(None))
    full.backward()
    full_grad = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    total = torch.zeros((), dtype=torch.float64)
    for rows in (slice(0, 1), slice(1, 5), slice(5, 10)):  # uneven micro-batches, gradients accumulate
        micro = step(rows)
        micro.backward()
        total += micro.detach()
    torch.testing.assert_close(total, full.detach())
    for got, expected in zip((p.grad for p in head.parameters()), full_grad):
        torch.testing.assert_close(got, expected)
    # And the value is the plain token mean over the global batch.
    per_token = reference_losses(mode, tail, 0.5, head(hidden).detach(), ids, teacher_lp, targets)
    assert full.item() == pytest.approx(per_token[mask].sum().item() / global_tokens, rel=1e-10)


def test_reduce_token_loss_ignores_nan_in_masked_positions():
    loss = torch.tensor([1.0, float("nan"), 3.0])
    assert reduce_token_loss(loss, torch.tensor([True, False, True]), 4).item() == 1.0
    with pytest.raises(ValueError):
        reduce_token_loss(loss, torch.ones(3, dtype=torch.bool), 0)


# ----------------------------------------------------------------------------------------------
# verl registration: inputs shaped exactly as verl's trainer and FSDP engine pass them
# ----------------------------------------------------------------------------------------------
def _verl_batch(seed: int, prompt_lens, response_lens):
    """A left/right padded rollout batch, as the agent loop builds it, converted by verl itself."""
    from tensordict import TensorDict

    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    rng = random.Random(seed)
    bsz, prompt_width, response_width = len(prompt_lens), max(prompt_lens), max(response_lens)
    width = prompt_width + response_width
    input_ids = torch.zeros(bsz, width, dtype=torch.long)
    attention_mask = torch.zeros(bsz, width, dtype=torch.long)
    response_mask = torch.zeros(bsz, response_width, dtype=torch.long)
    rollout_log_probs = torch.zeros(bsz, response_width)
    teacher_ids = torch.zeros(bsz, width, TOPK, dtype=torch.int32)  # verl's teacher manager uses int32
    teacher_lp = torch.zeros(bsz, width, TOPK)
    for row, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        span = slice(prompt_width - p, prompt_width + r)
        input_ids[row, span] = torch.tensor([rng.randrange(VOCAB) for _ in range(p + r)])
        attention_mask[row, span] = 1
        response_mask[row, :r] = 1
        rollout_log_probs[row, :r] = torch.tensor([-rng.uniform(0, 3) for _ in range(r)])
        # vLLM prompt_logprobs layout: entry t scores token t + 1; the last entry is a dummy of zeros.
        for t in range(p + r - 1):
            logits = torch.tensor([rng.gauss(0, 2) for _ in range(VOCAB)], dtype=torch.float64)
            lp, ids = torch.log_softmax(logits, -1).topk(TOPK)
            teacher_ids[row, prompt_width - p + t], teacher_lp[row, prompt_width - p + t] = ids, lp.float()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    td = TensorDict(
        {
            "prompts": input_ids[:, :prompt_width],
            "responses": input_ids[:, prompt_width:],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "response_mask": response_mask,
            "rollout_log_probs": rollout_log_probs,
            "teacher_ids": teacher_ids,
            "teacher_logprobs": teacher_lp,
        },
        batch_size=[bsz],
    )
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(td, dp_size=1, batch_num_tokens=int(response_mask.sum()), global_batch_size=bsz)
    return td


@pytest.fixture(scope="module")
def verl_losses():
    from verl_npd.losses import verl_registration

    verl_registration.register()
    verl_registration.register()  # the plugin may run twice in one process
    import verl.trainer.distillation.losses as verl_losses

    return verl_losses


def _configs(loss_mode, **loss_fields):
    from verl.workers.config import DistillationConfig, DistillationLossConfig, FSDPActorConfig

    actor = FSDPActorConfig(strategy="fsdp2", ppo_micro_batch_size_per_gpu=1, ppo_mini_batch_size=1, rollout_n=1)
    loss = DistillationLossConfig(
        loss_mode=loss_mode, topk=TOPK, use_policy_gradient=False, use_task_rewards=False, loss_max_clamp=None,
        **loss_fields,
    )
    return actor, DistillationConfig(enabled=False, distillation_loss=loss)


@pytest.mark.parametrize(
    "loss_name,mode,tail,beta",
    [
        ("npd_forward_kl_topk", "forward_kl_topk", "renorm", 0.5),
        ("npd_forward_kl_topk", "forward_kl_topk", "bucket", 0.5),
        ("npd_reverse_kl_topk", "reverse_kl_topk", "renorm", 0.5),
        ("npd_jsd", "jsd", "bucket", 0.8),
        ("npd_ce", "ce", "renorm", 0.5),
    ],
)
def test_registered_verl_loss_matches_reference(verl_losses, monkeypatch, loss_name, mode, tail, beta):
    from verl_npd.losses import verl_registration

    # The bridge main_npd sets from npd.loss; the workers' loss reads it.
    monkeypatch.setenv(verl_registration.ENV_VAR, json.dumps({"tail_mode": tail, "beta": beta}))
    prompt_lens, response_lens = [3, 5, 2], [4, 1, 6]
    td = _verl_batch(0, prompt_lens, response_lens)
    actor, distill = _configs(loss_name, chunked_topk_chunk_size=5)  # several chunks
    assert verl_losses.get_distillation_loss_settings(loss_name).use_topk

    total = int(td["input_ids"].offsets()[-1])
    logits = torch.randn(total, VOCAB, generator=torch.Generator().manual_seed(1), requires_grad=True)
    # 1. The engine's logits-processor call: (1, total_nnz, V) logits of the packed micro-batch.
    outputs = verl_losses.distillation_ppo_loss(actor, distill, data=td, student_logits=logits.unsqueeze(0))
    offsets = td["input_ids"].offsets()
    model_output = {k: torch.nested.nested_tensor_from_jagged(v.squeeze(0), offsets) for k, v in outputs.items()}
    # The engine's sampled-token log-probs (kept when distillation_only=False): the whole row rolled by one.
    values_ids = td["input_ids"].values()
    student_token_lp = torch.log_softmax(logits.detach(), -1).gather(-1, values_ids.roll(-1).unsqueeze(-1))
    model_output["log_probs"] = torch.nested.nested_tensor_from_jagged(student_token_lp.squeeze(-1), offsets)
    # 2. The registered function, looked up the way verl does.
    per_token, metrics = verl_losses.get_distillation_loss_fn(loss_name)(actor, distill, model_output, td)
    assert per_token.shape == (3, max(response_lens))
    assert 0 < metrics["distillation/teacher_mass"] <= 1

    # Reference: for each sample, the positions predicting its response tokens.
    teacher_ids, teacher_lp = td["teacher_ids"].values(), td["teacher_logprobs"].values()
    expected_sum, drift_sum = 0.0, 0.0
    for row, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        start = int(offsets[row])
        for j in range(r):
            t = start + p - 1 + j
            student_lp = ref_softmax(logits[t].double().tolist())[int(values_ids[t + 1])]
            drift_sum += td["rollout_log_probs"][row, j].item() - math.log(student_lp)
            expected = ref_token_loss(
                mode,
                tail,
                beta,
                logits[t].double().tolist(),
                teacher_ids[t].tolist(),
                teacher_lp[t].double().tolist(),
                int(values_ids[t + 1]),
            )
            assert per_token[row, j].item() == pytest.approx(expected, rel=1e-4, abs=1e-5)
            expected_sum += expected
        assert (per_token[row, r:] == 0).all()
    # npd/drift_kl: mean over the response tokens of log p_B - log p_S_now.
    assert metrics["npd/drift_kl"].aggregate() == pytest.approx(drift_sum / sum(response_lens), rel=1e-5)

    # 3. The final loss verl backpropagates: token mean over the global batch.
    loss, _ = verl_losses.distillation_ppo_loss(actor, distill, model_output=model_output, data=td)
    assert loss.item() == pytest.approx(expected_sum / sum(response_lens), rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_verl_builtin_loss_untouched_by_dispatch(verl_losses):
    td = _verl_batch(2, [3, 2], [2, 3])
    actor, distill = _configs("forward_kl_topk")
    total = int(td["input_ids"].offsets()[-1])
    logits = torch.randn(total, VOCAB, generator=torch.Generator().manual_seed(3))
    outputs = verl_losses.distillation_ppo_loss(actor, distill, data=td, student_logits=logits.unsqueeze(0))
    assert "distillation_losses" in outputs and "npd_distillation_losses" not in outputs


def test_loss_settings_bridge(verl_losses, monkeypatch):
    from verl_npd.losses import verl_registration

    monkeypatch.delenv(verl_registration.ENV_VAR, raising=False)
    assert verl_registration.env_settings() == NPDLossConfig()
    settings = NPDLossConfig(tail_mode="bucket", beta=0.9)
    monkeypatch.setenv(verl_registration.ENV_VAR, verl_registration.env_value(settings))
    assert verl_registration.env_settings() == settings
    for bad, message in [
        ('{"loss_mode": "ce"}', "keys among"),  # loss_mode is verl's field, not the bridge's
        ('{"chunk_size": 7}', "keys among"),  # so is the chunk size (chunked_topk_chunk_size)
        ('{"beta": 1.5}', "beta must lie in"),
        ("beta=0.9", "not JSON"),
    ]:
        monkeypatch.setenv(verl_registration.ENV_VAR, bad)
        with pytest.raises(ValueError, match=f"VERL_NPD_LOSS.*{message}"):
            verl_registration.register()  # at start-up, not at the first training step


def test_npd_loss_without_logits_processor_outputs_fails_loudly(verl_losses):
    td = _verl_batch(4, [2], [2])
    actor, distill = _configs("npd_forward_kl_topk")
    with pytest.raises(RuntimeError, match="logits processor"):
        verl_losses.get_distillation_loss_fn("npd_forward_kl_topk")(actor, distill, {}, td)


# verl's own top-k forward KL (the loss of verl's OPD) on a fixed batch, and verl's dynamic-batch
# micro-batching of it, in a fresh process: the numbers as JSON, and whether the plugin loaded.
VERL_LOSS_PROBE = """
import json, sys
import torch
sys.path.insert(0, {tests_dir!r})
import verl.trainer.distillation.losses as verl_losses
from verl.utils import tensordict_utils as tu
from verl.workers.engine.utils import prepare_micro_batches
from test_losses import VOCAB, _configs, _verl_batch

td = _verl_batch(5, [3, 5, 2, 4], [4, 1, 6, 3])
actor, distill = _configs("forward_kl_topk")
logits = torch.randn(int(td["input_ids"].offsets()[-1]), VOCAB, generator=torch.Generator().manual_seed(6))
logits.requires_grad_(True)
outputs = verl_losses.distillation_ppo_loss(actor, distill, data=td, student_logits=logits.unsqueeze(0))
offsets = td["input_ids"].offsets()
model_output = {{k: torch.nested.nested_tensor_from_jagged(v.squeeze(0), offsets) for k, v in outputs.items()}}
loss, metrics = verl_losses.distillation_ppo_loss(actor, distill, model_output=model_output, data=td)
loss.backward()
tu.assign_non_tensor(td, use_dynamic_bsz=True, max_token_len_per_gpu=16)
_, partitions = prepare_micro_batches(td)
print(json.dumps({{
    "plugin": "npd_forward_kl_topk" in verl_losses.DISTILLATION_LOSS_REGISTRY,
    "per_token": {{k: v.tolist() for k, v in outputs.items()}},
    "loss": loss.item(),
    "grad": logits.grad.tolist(),
    "micro_batches": partitions,
}}))
"""


def test_verls_own_topk_loss_is_the_same_with_and_without_the_plugin():
    """Installing verl-npd changes nothing for a verl user who selects no NPD component: verl's own
    top-k forward KL, its gradient and verl's micro-batching of the batch come out bit-identical in
    a process where the plugin is loaded and in one where verl skips it
    (``VERL_USE_EXTERNAL_PLUGINS=none``, verl/__init__.py:55-76)."""
    import os
    import subprocess
    import sys

    tests_dir = os.path.dirname(os.path.abspath(__file__))
    probes = {
        plugins: subprocess.Popen(
            [sys.executable, "-c", VERL_LOSS_PROBE.format(tests_dir=tests_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "VERL_USE_EXTERNAL_PLUGINS": plugins},
        )
        for plugins in ("auto", "none")
    }
    results = {}
    for plugins, probe in probes.items():
        stdout, stderr = probe.communicate(timeout=300)
        assert probe.returncode == 0, stderr[-3000:]
        results[plugins] = json.loads(stdout.strip().splitlines()[-1])
    assert results["auto"].pop("plugin") is True and results["none"].pop("plugin") is False
    assert results["auto"]["loss"] > 0 and len(results["auto"]["micro_batches"]) > 1
    assert results["auto"] == results["none"]

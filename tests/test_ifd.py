"""IFD / Δ-IFD terms against independent references: per-prefix forwards in a Python loop, and the
spec's formulas by hand."""

import math

import pytest
import torch
from tiny_models import build_tiny_qwen2, build_tiny_tokenizer
from transformers import PreTrainedTokenizerFast

from verl_npd.filters.ifd import (
    NONFINITE,
    OK,
    TOO_SHORT,
    UNCOND_NLL_ZERO,
    ChatTemplateError,
    IFDScores,
    TokenizerInfo,
    TokenNLL,
    delta_ifd,
    ifd_from_nll,
    mean_token_nll,
    render_chat_ids,
    response_logprobs,
    unconditional_response_logprobs,
)

PROMPTS = ["What is two plus two?", "Name a colour.", "Write a short poem about the sea."]
RESPONSES = ["Two plus two is four.", "Blue.", "Waves roll in, waves roll out, the sea is a colour."]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_qwen2(None, vocab_size=len(tokenizer), seed=1)


@pytest.fixture(scope="module")
def batch(tokenizer):
    """(prompt ids, response ids) per sample, built as at generation time."""
    prompts = [
        render_chat_ids(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS
    ]
    responses = [tokenizer.encode(r, add_special_tokens=False) + [tokenizer.eos_token_id] for r in RESPONSES]
    return prompts, responses


def brute_force_logprobs(model, context: list[int], response: list[int]) -> list[float]:
    """log p(y_i | context, y_<i): one unpadded forward per prefix, the last position's logits."""
    out = []
    with torch.no_grad():
        for i, token in enumerate(response):
            logits = model(input_ids=torch.tensor([context + response[:i]])).logits[0, -1].double()
            out.append(torch.log_softmax(logits, dim=-1)[token].item())
    return out


def hand_mean_nll(logprobs: list[float]) -> float:
    return -sum(logprobs) / len(logprobs)


# --- the assistant header -------------------------------------------------------------------


def test_header_is_the_qwen_assistant_header_without_system_or_user_turn(tokenizer):
    info = TokenizerInfo.from_tokenizer(tokenizer)
    assert list(info.header_ids) == tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert tokenizer.decode(list(info.header_ids)) == "<|im_start|>assistant\n"
    assert info.pad_token_id == tokenizer.pad_token_id


def test_header_is_the_tail_of_every_generation_prompt(tokenizer, batch):
    header = list(TokenizerInfo.from_tokenizer(tokenizer).header_ids)
    for prompt_ids in batch[0]:
        assert prompt_ids[-len(header) :] == header


def test_header_keeps_a_leading_bos(tokenizer, tmp_path):
    bos_tokenizer = build_tiny_tokenizer(
        tmp_path, chat_template="{{ bos_token }}" + tokenizer.chat_template
    )
    bos_tokenizer.bos_token = "<|endoftext|>"
    header = TokenizerInfo.from_tokenizer(bos_tokenizer).header_ids
    assert header[0] == bos_tokenizer.bos_token_id
    assert bos_tokenizer.decode(list(header)) == "<|endoftext|><|im_start|>assistant\n"


# The generation prompt of Qwen3's chat template (its tokenizer_config.json), verbatim: with
# enable_thinking=false the assistant turn opens with an empty think block.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


@pytest.mark.parametrize("enable_thinking", [False, True])
def test_the_unconditional_prefill_opens_with_the_header_the_prompts_end_with(tmp_path, enable_thinking):
    """The trainer derives the header of the unconditional Δ-IFD prefills with verl's
    data.apply_chat_template_kwargs, as its prompts are rendered: Qwen3 in non-thinking mode puts
    an empty think block after the assistant header, and the unconditional terms must condition on
    it as the response did."""
    from omegaconf import OmegaConf

    from verl_npd.trainer.near_policy_trainer import assistant_header_ids

    qwen3 = build_tiny_tokenizer(tmp_path, chat_template=QWEN3_CHAT_TEMPLATE)
    data = OmegaConf.create({"apply_chat_template_kwargs": {"enable_thinking": enable_thinking}})
    header = list(assistant_header_ids(qwen3, data))
    # The reference: the text Qwen3's template appends, tokenized on its own.
    opening = "<|im_start|>assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n")
    assert header == qwen3.encode(opening, add_special_tokens=False)
    # The prefill of header + response, for a response the student wrote after such a prompt, is
    # exactly the tokens that followed the user turn at generation.
    prompt = render_chat_ids(qwen3, [{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True,
                             enable_thinking=enable_thinking)
    response = qwen3.encode(RESPONSES[0], add_special_tokens=False)
    user_turn = render_chat_ids(qwen3, [{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=False)
    assert header + response == (prompt + response)[len(user_turn):]
    if not enable_thinking:
        # Without the kwargs (the trainer's former derivation) the think block would be missing.
        assert list(TokenizerInfo.from_tokenizer(qwen3).header_ids) != header


def test_header_errors_are_clear(tokenizer):
    no_template = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        TokenizerInfo.from_tokenizer(no_template)
    no_header = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer,
        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}",
    )
    with pytest.raises(ChatTemplateError, match="adds no tokens"):
        TokenizerInfo.from_tokenizer(no_header)


# --- log-probs and IFD vs brute force ---------------------------------------------------------


def test_conditional_logprobs_match_per_prefix_forwards(model, tokenizer, batch):
    prompts, responses = batch
    # batch_size=2 over 3 samples: padding inside a batch and a second, smaller batch.
    logprobs, mask = response_logprobs(model, prompts, responses, pad_token_id=tokenizer.pad_token_id, batch_size=2)
    assert logprobs.shape == mask.shape == (3, max(map(len, responses)))
    for i, (p, r) in enumerate(zip(prompts, responses)):
        assert mask[i].sum().item() == len(r)
        assert logprobs[i, : len(r)].tolist() == pytest.approx(brute_force_logprobs(model, p, r), abs=1e-4)


def test_unconditional_logprobs_match_header_plus_response_forwards(model, tokenizer, batch):
    _, responses = batch
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)  # written by hand
    info = TokenizerInfo.from_tokenizer(tokenizer)
    logprobs, mask = unconditional_response_logprobs(model, info, responses, batch_size=2)
    for i, r in enumerate(responses):
        assert mask[i].sum().item() == len(r)
        assert logprobs[i, : len(r)].tolist() == pytest.approx(brute_force_logprobs(model, header, r), abs=1e-4)


def test_ifd_matches_hand_computed_ratio_of_means(model, tokenizer, batch):
    prompts, responses = batch
    info = TokenizerInfo.from_tokenizer(tokenizer)
    cond = mean_token_nll(*response_logprobs(model, prompts, responses, pad_token_id=0, batch_size=3))
    uncond = mean_token_nll(*unconditional_response_logprobs(model, info, responses, batch_size=1))
    scores = ifd_from_nll(cond, uncond)
    header = list(info.header_ids)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        s_cond = hand_mean_nll(brute_force_logprobs(model, p, r))
        s_uncond = hand_mean_nll(brute_force_logprobs(model, header, r))
        assert scores.status[i] == OK
        assert scores.nll_cond[i].item() == pytest.approx(s_cond, rel=1e-5)
        assert scores.nll_uncond[i].item() == pytest.approx(s_uncond, rel=1e-5)
        assert scores.ifd[i].item() == pytest.approx(s_cond / s_uncond, rel=1e-5)
        assert scores.num_tokens[i].item() == len(r)


def test_empty_responses_are_not_run_and_come_back_masked(model, tokenizer, batch):
    prompts, responses = batch
    logprobs, mask = response_logprobs(model, prompts[:2], [responses[0], []], pad_token_id=0)
    assert not mask[1].any() and (logprobs[1] == 0).all()
    assert logprobs[0, : len(responses[0])].tolist() == pytest.approx(
        brute_force_logprobs(model, prompts[0], responses[0]), abs=1e-4
    )


# --- exclusions: never NaN/inf ----------------------------------------------------------------


def nll(values: list[float], tokens: list[int]) -> TokenNLL:
    return TokenNLL(torch.tensor(values, dtype=torch.float64), torch.tensor(tokens))


def test_length_0_and_1_responses_are_excluded_as_too_short_without_nan():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    cond = mean_token_nll(logprobs, mask)
    uncond = mean_token_nll(2 * logprobs, mask)
    assert torch.isfinite(cond.nll).all() and cond.num_tokens.tolist() == [3, 1, 0]
    scores = ifd_from_nll(cond, uncond)
    assert scores.status == (OK, TOO_SHORT, TOO_SHORT)
    assert torch.isfinite(scores.ifd).all()
    assert scores.ifd.tolist() == pytest.approx([0.5, 0.0, 0.0])
    delta = delta_ifd("teacher_minus_behaviour", teacher=scores, behaviour=scores)
    assert delta.status == (OK, TOO_SHORT, TOO_SHORT) and torch.isfinite(delta.values).all()


def test_masked_out_infinities_are_ignored_but_masked_in_ones_are_nonfinite():
    logprobs = torch.tensor([[-1.0, -1.0, -math.inf], [-1.0, -math.inf, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    scores = ifd_from_nll(mean_token_nll(logprobs, mask), mean_token_nll(logprobs, mask))
    assert scores.status == (OK, NONFINITE)
    assert scores.ifd.tolist() == [1.0, 0.0]


def test_unconditional_nll_near_zero_is_excluded():
    scores = ifd_from_nll(nll([0.5, 0.5, 0.5], [4, 4, 4]), nll([1.0, 5e-7, 0.0], [4, 4, 4]))
    assert scores.status == (OK, UNCOND_NLL_ZERO, UNCOND_NLL_ZERO)
    assert torch.isfinite(scores.ifd).all()
    custom = ifd_from_nll(nll([0.5], [4]), nll([5e-7], [4]), min_uncond_nll=1e-7)
    assert custom.status == (OK,) and custom.ifd.item() == pytest.approx(1e6)


def test_token_count_mismatch_between_terms_is_an_error():
    with pytest.raises(ValueError, match="different numbers of response tokens"):
        ifd_from_nll(nll([1.0], [3]), nll([1.0], [4]))


# --- Δ-IFD variants vs hand formulas ----------------------------------------------------------


def scores_from(cond: list[float], uncond: list[float]) -> IFDScores:
    return ifd_from_nll(nll(cond, [5] * len(cond)), nll(uncond, [5] * len(cond)))


def test_delta_ifd_modes_match_hand_formulas():
    teacher = scores_from([0.4, 1.5, 0.9], [2.0, 1.0, 0.9])  # IFD_T = 0.2, 1.5, 1.0
    behaviour = scores_from([0.6, 0.5, 0.3], [1.2, 2.0, 0.6])  # IFD_B = 0.5, 0.25, 0.5
    student = scores_from([0.7, 0.2, 0.8], [1.4, 1.0, 1.0])  # IFD_S = 0.5, 0.2, 0.8
    ifd_t, ifd_b, ifd_s = [0.4 / 2.0, 1.5 / 1.0, 0.9 / 0.9], [0.6 / 1.2, 0.5 / 2.0, 0.3 / 0.6], [0.5, 0.2, 0.8]

    d = delta_ifd("teacher_minus_behaviour", teacher=teacher, behaviour=behaviour)
    assert d.values.tolist() == pytest.approx([t - b for t, b in zip(ifd_t, ifd_b)])
    d = delta_ifd("student_lag", behaviour=behaviour, student=student)
    assert d.values.tolist() == pytest.approx([s - b for s, b in zip(ifd_s, ifd_b)])
    d = delta_ifd("log_ratio", teacher=teacher, behaviour=behaviour)
    assert d.values.tolist() == pytest.approx([math.log(t) - math.log(b) for t, b in zip(ifd_t, ifd_b)])
    assert d.status == (OK, OK, OK)


def test_delta_ifd_status_takes_the_first_exclusion_of_either_model():
    teacher = ifd_from_nll(nll([1.0, 1.0, 1.0, 0.0], [5, 1, 5, 5]), nll([2.0, 2.0, 0.0, 2.0], [5, 1, 5, 5]))
    behaviour = ifd_from_nll(
        nll([1.0, math.nan, 1.0, 1.0], [5, 1, 5, 5]), nll([2.0, 2.0, math.inf, 2.0], [5, 1, 5, 5])
    )
    d = delta_ifd("teacher_minus_behaviour", teacher=teacher, behaviour=behaviour)
    assert d.status == (OK, TOO_SHORT, NONFINITE, OK)
    # log IFD_T with IFD_T = 0 (s_T(y|x) = 0) is -inf: excluded as nonfinite, value a finite placeholder.
    d = delta_ifd("log_ratio", teacher=teacher, behaviour=behaviour)
    assert d.status == (OK, TOO_SHORT, NONFINITE, NONFINITE)
    assert torch.isfinite(d.values).all()


def test_delta_ifd_names_missing_inputs_and_unknown_modes():
    scores = scores_from([1.0], [2.0])
    with pytest.raises(ValueError, match="missing: \\['student'\\]"):
        delta_ifd("student_lag", behaviour=scores)
    with pytest.raises(ValueError, match="unknown Δ-IFD mode 'kl'"):
        delta_ifd("kl", teacher=scores, behaviour=scores)

"""Across tokenizers with the second toy teacher (``verl_npd.toy.cross``): scored by
``python -m verl_npd.serve`` through the rollout manager, every number the teacher gives is checked
against a plain forward pass of the teacher on its own tokens; the preflight accepts the teacher only
with ``npd.cross_tokenizer.enabled`` and names the switch otherwise; and one end-to-end run of the
``npd_toy_cross`` demo (the one Ray run of this feature)."""

import asyncio
import math

import pytest
import torch
from conftest import compose, run_on_policy
from test_cross_tokenizer import forward_scores
from test_remote_teacher import _free_port, _start_server, _stop

from verl_npd.filters.delta_ifd import DeltaIFDFilter, DeltaIFDFilterConfig
from verl_npd.rollout.async_manager import AsyncRolloutManager, PromptItem, Rollout
from verl_npd.rollout.cross_tokenizer import CrossTokenizer
from verl_npd.rollout.remote_teacher import HTTPTeacher

TOPK = 8


@pytest.fixture(scope="module")
def cross_teacher():
    from verl_npd.toy.cross import ensure_cross_teacher

    return ensure_cross_teacher(quiet=True)


@pytest.fixture(scope="module")
def models(toy_world, cross_teacher):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)

    return load(toy_world.student_dir), load(cross_teacher.teacher_dir)


@pytest.fixture(scope="module")
def served_cross_teacher(cross_teacher):
    port = _free_port()
    process = _start_server(cross_teacher.teacher_dir, port, "--max-logprobs", str(TOPK))
    yield port
    _stop(process)


def test_the_cross_teacher_is_another_tokenizer_and_answers(models, cross_teacher, toy_world):
    """Re-measured, not read from the manifest: its vocabulary is not the student's, it is a
    different family, and it answers most validation prompts."""
    from verl_npd.toy import evaluate_accuracy, read_problems

    (_, student), (teacher_model, teacher) = models
    assert teacher.get_vocab() != student.get_vocab() and len(teacher) > 5 * len(student)
    assert type(teacher_model).__name__ == "GraniteForCausalLM"
    prompts, answers = read_problems(toy_world.val_parquet)
    assert evaluate_accuracy(teacher_model, teacher, prompts[:128], answers[:128]) >= 0.9


class _StudentScorer:
    def __init__(self, model):
        self.model = model

    async def score(self, sequences, num_logprobs):
        return [forward_scores(self.model, list(s), max(num_logprobs, 1)) for s in sequences]


def test_a_served_teacher_scores_in_its_own_tokens(models, served_cross_teacher, toy_world):
    (student_model, student), (teacher_model, teacher) = models
    view = CrossTokenizer(student, teacher)
    http = HTTPTeacher([f"http://127.0.0.1:{served_cross_teacher}/v1"], api="vllm", model="toy", api_key=None,
                       max_concurrency=2, max_tokens_per_request=256, timeout_s=60, max_wait_s=30,
                       probe_timeout_s=5, num_valid_tokens=len(teacher))  # fmt: skip
    header = [student.convert_tokens_to_ids("<|im_start|>"), student.convert_tokens_to_ids("assistant"), 20]
    assert student.decode(header) == "<|im_start|>assistant\n"
    manager = AsyncRolloutManager(
        student_generation_client=None, student_scorer=_StudentScorer(student_model), teacher_scorers={"t": http},
        teacher_topk=TOPK, buffer=None, sample_filter=DeltaIFDFilter(DeltaIFDFilterConfig(enabled=False)),
        prompt_fn=None, stream=None, header_ids=header, samples_per_prompt=1, sampling_params={},
        max_wave_prompts=1, max_waves_in_flight=1, request_timeout_s=60, max_retries=0, seed=0,
        cross_tokenizers={"t": view},
    )  # fmt: skip
    texts = ["47+8=55. 55-6=49. Answer: 49", "93-7=86. Answer:86", "12+9=21. 21+1=23. Answer: 24"]
    rollouts = []
    for i, (prompt, text) in enumerate(zip(["Compute 47+8-6.", "Compute 93-7.", "Compute 12+9+1."], texts)):
        messages = [{"role": "user", "content": prompt}]
        prompt_ids = student.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        response_ids = student.encode(text, add_special_tokens=False) + [student.eos_token_id]
        own = forward_scores(student_model, prompt_ids + response_ids, 1).token_log_probs[len(prompt_ids) - 1 :]
        rollouts.append(Rollout(PromptItem(i, prompt_ids, None, {}, messages), response_ids, own, 0, False))
    samples, _, metrics = asyncio.run(manager._score(rollouts))

    end = teacher.eos_token_id
    for rollout, sample, text in zip(rollouts, samples, texts):
        # The reference: the teacher's own rendering of the same conversation, tokenised as one text.
        prompt_text = teacher.apply_chat_template(rollout.prompt.messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = teacher.encode(prompt_text, add_special_tokens=False)
        full = teacher.encode(prompt_text + text, add_special_tokens=False) + [end]
        response_ids = full[len(prompt_ids) :]
        reference = forward_scores(teacher_model, full, TOPK)
        assert sample.teacher_cond == pytest.approx(reference.token_log_probs[len(prompt_ids) - 1 :], abs=1e-4)
        header_ids = teacher.encode("<s><|assistant|>\n", add_special_tokens=False)
        uncond = forward_scores(teacher_model, header_ids + response_ids, 1).token_log_probs[len(header_ids) - 1 :]
        assert sample.teacher_uncond == pytest.approx(uncond, abs=1e-4)
        assert len(sample.teacher_cond) == len(response_ids) != len(rollout.response_ids)

        teacher_sample = view.teacher_sample(rollout.prompt.messages, rollout.response_ids)
        assert teacher_sample.prompt_ids == prompt_ids and teacher_sample.response_ids == response_ids
        # The served scores on the student's rows are the forward pass's, projected (the projection
        # is checked by hand in test_cross_tokenizer.py).
        expected = view.project(teacher_sample, reference, len(rollout.prompt.prompt_ids), len(rollout.response_ids))
        assert torch.equal(sample.teacher_span, expected.span)
        # Not all-empty: most response rows carry a target. Some may not: a row inside a teacher
        # token whose top-k holds no candidate starting with the characters already written.
        assert (expected.span[-len(rollout.response_ids) - 1 : -1] > 0).float().mean() > 0.75
        torch.testing.assert_close(sample.teacher_topk_ids, expected.topk_ids, rtol=0, atol=0)
        torch.testing.assert_close(sample.teacher_topk_log_probs, expected.topk_log_probs, rtol=0, atol=1e-4)
    assert 0.2 < metrics["npd/cross_tokenizer/span_token_fraction"] < 0.8

    # Δ-IFD: each IFD over its own tokens, a ratio of the response's whole log-likelihoods; the
    # sample's length is the student's.
    decision = manager._filter(samples)
    for rollout, sample, delta, count in zip(rollouts, samples, decision.delta.values, decision.delta.num_tokens):
        ifd_teacher = sum(sample.teacher_cond) / sum(sample.teacher_uncond)
        ifd_behaviour = sum(rollout.log_probs) / sum(sample.behaviour_uncond)
        assert delta.item() == pytest.approx(ifd_teacher - ifd_behaviour, rel=1e-6)
        assert count == len(rollout.response_ids)


def test_preflight_accepts_another_vocabulary_only_across_tokenizers(cross_teacher, served_cross_teacher):
    from verl_npd.rollout.teacher_probe import TeacherProbeError, probe_served_teacher
    from verl_npd.trainer.preflight import PreflightError, preflight

    assert preflight(compose("verl_npd/config", "npd_toy_cross"), collect=True).problems == []
    with pytest.raises(PreflightError, match=r"tokenizers differ: .*set npd.cross_tokenizer.enabled=true"):
        preflight(compose("verl_npd/config", "npd_toy_cross", ["npd.cross_tokenizer.enabled=false"]))
    # A served teacher: its /tokenize is compared with the tokenizer at its model_path.
    url = [f"http://127.0.0.1:{served_cross_teacher}/v1"]
    served = ["ray_kwargs.ray_init.num_gpus=1", f"npd.teacher.url={url[0]}", "npd.teacher.model=toy"]
    assert preflight(compose("verl_npd/config", "npd_toy_cross", served), collect=True).problems == []
    from transformers import AutoTokenizer

    student = AutoTokenizer.from_pretrained(compose("verl_npd/config", "npd_toy").actor_rollout_ref.model.path)
    with pytest.raises(TeacherProbeError, match="tokenizes differently from the student .*npd.cross_tokenizer.enabled=true"):
        probe_served_teacher(url, "vllm", "toy", None, TOPK, student, 5.0)


def test_npd_distils_across_tokenizers(tmp_path):
    """The demo's config end to end, on-policy for 4 small steps: the teacher replica scores in its
    own tokens and the workers train on the cross-tokenizer loss."""
    history = run_on_policy(tmp_path, ["--config-name", "npd_toy_cross"])
    for row in history:
        # The loss the workers ran is the cross-tokenizer one (only it reports ULD; on the toy the
        # student's tokens almost never cross the teacher's, so the term itself is about 0).
        assert "npd/cross_tokenizer/uld" in row
        assert 0.2 < row["npd/cross_tokenizer/span_token_fraction"] < 0.8
        assert 0 < row["actor/distillation/teacher_mass"] <= 1 and math.isfinite(row["actor/loss"])

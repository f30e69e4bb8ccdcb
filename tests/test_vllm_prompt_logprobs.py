"""The patch that keeps vLLM's actual-token prompt log-probs next to verl's top-k, checked on
vLLM-shaped outputs built here (vLLM itself is not installed in the default test environment)."""

import sys
import textwrap
from types import SimpleNamespace

import torch

from verl_npd.platform.verl_version import apply_once_when_imported
from verl_npd.engines.vllm_prompt_logprobs import patch_server_module, prompt_token_logprobs


def _vllm_output(prompt_ids, logits, k):
    """A ``RequestOutput`` as vLLM builds it for ``prompt_logprobs=k``: per position after the
    first, a dict of token id -> Logprob(logprob, rank) with the top-k and the actual token."""
    logprobs = logits.log_softmax(-1)
    positions = [None]
    for t in range(1, len(prompt_ids)):
        row = logprobs[t - 1]
        ranks = row.argsort(descending=True).tolist()
        entries = {
            token: SimpleNamespace(logprob=float(row[token]), rank=ranks.index(token) + 1) for token in ranks[:k]
        }
        actual = prompt_ids[t]
        entries[actual] = SimpleNamespace(logprob=float(row[actual]), rank=ranks.index(actual) + 1)
        positions.append(entries)
    return SimpleNamespace(prompt_token_ids=prompt_ids, prompt_logprobs=positions)


def test_actual_token_logprobs_even_outside_the_top_k():
    torch.manual_seed(0)
    prompt = [3, 9, 1, 7, 7, 2]
    logits = torch.randn(len(prompt), 12)
    output = _vllm_output(prompt, logits, k=2)
    expected = logits.log_softmax(-1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    got = prompt_token_logprobs(output.prompt_token_ids, output.prompt_logprobs)
    assert got[-1] == 0.0 and len(got) == len(prompt)
    torch.testing.assert_close(torch.tensor(got[:-1]), expected)
    # The case verl's own extraction loses: some actual tokens rank below the top 2.
    assert any(output.prompt_logprobs[t + 1][token].rank > 2 for t, token in enumerate(prompt[1:]))


def test_the_server_module_is_wrapped_when_imported_and_keeps_verls_fields(tmp_path, monkeypatch):
    # A stand-in for verl's vllm_async_server: it binds extract_prompt_logprobs at import, like verl's.
    (tmp_path / "fake_vllm_server.py").write_text(
        textwrap.dedent(
            """
            def extract_prompt_logprobs(output, num_prompt_logprobs, result_dict):
                if num_prompt_logprobs is None:
                    return
                result_dict["prompt_logprobs"] = "verl's"
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))

    def hooks():
        return [finder for finder in sys.meta_path if getattr(finder, "module_name", None) == "fake_vllm_server"]

    apply_once_when_imported("fake_vllm_server_patch", "fake_vllm_server", patch_server_module)
    assert len(hooks()) == 1 and "fake_vllm_server" not in sys.modules  # nothing imported yet
    import fake_vllm_server

    assert hooks() == []  # the hook leaves once it has run
    output = _vllm_output([1, 2, 3], torch.randn(3, 5), k=1)
    fields = {}
    fake_vllm_server.extract_prompt_logprobs(output, 1, fields)
    assert fields["prompt_logprobs"] == "verl's" and len(fields["prompt_token_logprobs"]) == 3
    untouched = {}
    fake_vllm_server.extract_prompt_logprobs(output, None, untouched)
    assert untouched == {}
    monkeypatch.delitem(sys.modules, "fake_vllm_server")

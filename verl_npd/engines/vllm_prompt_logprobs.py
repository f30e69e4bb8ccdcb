"""verl's vLLM server: keep the actual tokens' log-probs next to the top-k prompt log-probs.

vLLM answers ``prompt_logprobs=k`` with, for every prompt position, the top-k log-probs and the
log-prob of the actual next token (vllm/v1/engine/logprobs.py: the prompt token is always added to
the position's dict, with its rank). verl's ``extract_prompt_logprobs``
(verl/workers/rollout/vllm_rollout/utils.py:540-573, called at vllm_async_server.py:705) keeps only
the top-k and drops the actual token when it falls outside it. NPD needs both from the teacher's
one prefill: the top-k are the distillation targets, the actual tokens give the teacher's IFD. So
this patch adds ``extra_fields["prompt_token_logprobs"]`` (entry t: log p(token t+1), then one zero
pad, like verl's layout) and leaves every field verl fills as it was.

vllm_async_server binds ``extract_prompt_logprobs`` by name and imports vLLM, which most processes
never load; the patch therefore waits for that module to be imported (in the vLLM server's own
process) and wraps the name there. verl's teacher loop reads only the fields it knows
(verl/experimental/teacher_loop/teacher_manager.py:141-142), so the added one changes nothing for it.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from typing import Any

from verl_npd.platform.verl_version import apply_once_when_imported
from verl_npd.engines.prompt_logprobs import PROMPT_TOKEN_LOGPROBS

VLLM_SERVER_MODULE = "verl.workers.rollout.vllm_rollout.vllm_async_server"


def prompt_token_logprobs(prompt_token_ids, prompt_logprobs) -> list[float]:
    """log p(actual token t+1) for every position t of a vLLM ``RequestOutput``'s prompt, then a
    zero pad entry (vLLM's first entry, for the first token, is None and is skipped)."""
    values = [float(position[token].logprob) for token, position in zip(prompt_token_ids[1:], prompt_logprobs[1:])]
    return values + [0.0]


def _wrap(extract_prompt_logprobs):
    @functools.wraps(extract_prompt_logprobs)
    def extract_with_token_logprobs(output, num_prompt_logprobs, result_dict: dict[str, Any]):
        extract_prompt_logprobs(output, num_prompt_logprobs, result_dict)
        if num_prompt_logprobs is not None:
            result_dict[PROMPT_TOKEN_LOGPROBS] = prompt_token_logprobs(output.prompt_token_ids, output.prompt_logprobs)

    extract_with_token_logprobs.verl_npd_patched = True
    return extract_with_token_logprobs


def patch_server_module(module) -> None:
    if not getattr(module.extract_prompt_logprobs, "verl_npd_patched", False):
        module.extract_prompt_logprobs = _wrap(module.extract_prompt_logprobs)


def register() -> None:
    if VLLM_SERVER_MODULE in sys.modules or importlib.util.find_spec("vllm") is not None:
        apply_once_when_imported("vllm_prompt_token_logprobs", VLLM_SERVER_MODULE, patch_server_module)

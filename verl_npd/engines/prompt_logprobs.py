"""The prefill NPD's scoring asks an engine for, and the fields its answer carries besides verl's.

A prefill is a generate request for one token with ``prompt_logprobs``: verl's servers answer it
with the top-k of every prompt position (``extra_fields["prompt_ids"|"prompt_logprobs"]``, verl's
vLLM layout). NPD also needs each actual token's log-prob (the teacher's IFD), which verl's servers
drop: ``npd_cpu`` always adds it, and :mod:`verl_npd.engines.vllm_prompt_logprobs` makes verl's
vLLM server add it. The scoring client (:mod:`verl_npd.rollout.scoring`) reads what is named here.
"""

from __future__ import annotations

from typing import Any

# The key under which servers return log p(actual token) next to the top-k in ``extra_fields``.
PROMPT_TOKEN_LOGPROBS = "prompt_token_logprobs"
# ... and the rank of each actual token among all tokens (``npd_cpu``; what ``verl_npd.serve`` reports
# as vLLM's ``rank``).
PROMPT_TOKEN_RANKS = "prompt_token_ranks"


def scoring_params(num_logprobs: int) -> dict[str, Any]:
    """A prefill request: the prompt's log-probs (top ``num_logprobs``; 0 = the actual token only)."""
    return {"max_tokens": 1, "temperature": 1.0, "prompt_logprobs": num_logprobs, "detokenize": False}

"""verl's vLLM server: tag a response with the oldest weights that wrote it, not the newest.

verl's ``vLLMHttpServer.generate`` tags its answer with the weight version the server holds when the
answer is ready (``extra_fields["global_steps"]``, verl/workers/rollout/vllm_rollout/
vllm_async_server.py:689), and verl's client takes it as both the oldest and the newest version
(``min_global_steps``/``max_global_steps``, verl/workers/rollout/llm_server.py:160-162). In verl's
own loops no sync lands while a request runs. NPD keeps a colocated student replica generating
through its syncs (``naive``: the weights are loaded between two engine steps,
verl/workers/rollout/vllm_rollout/vllm_rollout.py:228-250), so a request can start on one version
and finish on the next, its KV cache holding both: tagged with the newer, its staleness was
understated and no sample ever counted as spanning a sync.

The patch wraps ``generate``: ``min_global_steps`` is the version when the request reached the
server, ``max_global_steps`` the version when it answered. The version is set only after the weights
are loaded (vllm_rollout.py:244-250), so the weights that prefilled the request are that version or
newer: the tag is never newer than the oldest weights that produced a token; it is one sync older
than that when the sync lands between arrival and prefill. verl's clients keep fields the server
sets (``setdefault``, llm_server.py:160-162; the partial-rollout client derives its own from each
part's ``global_steps``, llm_server.py:324-349), and the two values differ from verl's only when a
sync landed during the request: nothing changes for verl's own loops.

Like :mod:`verl_npd.engines.vllm_prompt_logprobs`, it waits for the server module to be imported (in
the processes that load vLLM) and patches the class there, before Ray builds the server actor from it.
"""

from __future__ import annotations

import functools
import importlib.util
import sys

from verl_npd.platform.verl_version import apply_once_when_imported
from verl_npd.engines.vllm_prompt_logprobs import VLLM_SERVER_MODULE


def _wrap(generate):
    @functools.wraps(generate)
    async def generate_tagged_with_oldest_weights(self, *args, **kwargs):
        arrived_with = self.global_steps
        output = await generate(self, *args, **kwargs)
        output.extra_fields.setdefault("min_global_steps", arrived_with)
        output.extra_fields.setdefault("max_global_steps", output.extra_fields.get("global_steps"))
        return output

    generate_tagged_with_oldest_weights.verl_npd_patched = True
    return generate_tagged_with_oldest_weights


def patch_server_class(module) -> None:
    server = module.vLLMHttpServer
    if not getattr(server.generate, "verl_npd_patched", False):
        server.generate = _wrap(server.generate)


def register() -> None:
    if VLLM_SERVER_MODULE in sys.modules or importlib.util.find_spec("vllm") is not None:
        apply_once_when_imported("vllm_weight_versions", VLLM_SERVER_MODULE, patch_server_class)

"""The patch that tags verl's vLLM answers with the oldest weights that wrote them, on a stand-in for
verl's server class (vLLM itself is not installed in the default test environment): a weight sync
lands while a request runs, as it does on NPD's colocated replicas."""

import asyncio
import inspect
import sys
import textwrap
from types import SimpleNamespace

from verl_npd.platform.verl_version import apply_once_when_imported
from verl_npd.engines.vllm_weight_versions import patch_server_class


def test_a_request_running_across_a_sync_is_tagged_with_both_versions(tmp_path, monkeypatch):
    # Like verl's vLLMHttpServer: generate answers with the version it holds when the answer is ready
    # (vllm_async_server.py:689), set_global_steps runs after a sync loaded the weights.
    (tmp_path / "fake_vllm_versions_server.py").write_text(
        textwrap.dedent(
            """
            import asyncio

            class vLLMHttpServer:
                def __init__(self):
                    self.global_steps = 3
                    self.step = asyncio.Event()

                async def generate(self, prompt_ids, sampling_params, request_id, priority=0):
                    await self.step.wait()
                    return Answer({"global_steps": self.global_steps})

                async def set_global_steps(self, global_steps):
                    self.global_steps = global_steps

            class Answer:
                def __init__(self, extra_fields):
                    self.extra_fields = extra_fields
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    apply_once_when_imported("fake_vllm_weight_versions", "fake_vllm_versions_server", patch_server_class)
    import fake_vllm_versions_server

    async def scenario():
        server = fake_vllm_versions_server.vLLMHttpServer()
        across = asyncio.ensure_future(server.generate([1, 2], {}, "across"))
        await asyncio.sleep(0)  # the request has reached the server
        await server.set_global_steps(5)  # a sync lands while it runs
        server.step.set()
        after = await server.generate([1, 2], {}, "after")
        return (await across).extra_fields, after.extra_fields

    across, after = asyncio.run(scenario())
    assert across == {"global_steps": 5, "min_global_steps": 3, "max_global_steps": 5}
    # A request that ran on one version: what verl's client would have set anyway (llm_server.py:160-162).
    assert after == {"global_steps": 5, "min_global_steps": 5, "max_global_steps": 5}
    # The signature Ray reads to build the actor's method table is verl's.
    assert list(inspect.signature(fake_vllm_versions_server.vLLMHttpServer.generate).parameters)[:4] == [
        "self", "prompt_ids", "sampling_params", "request_id"
    ]
    assert inspect.iscoroutinefunction(fake_vllm_versions_server.vLLMHttpServer.generate)
    patch_server_class(SimpleNamespace(vLLMHttpServer=fake_vllm_versions_server.vLLMHttpServer))  # applied once only
    assert not getattr(fake_vllm_versions_server.vLLMHttpServer.generate.__wrapped__, "verl_npd_patched", False)
    monkeypatch.delitem(sys.modules, "fake_vllm_versions_server")

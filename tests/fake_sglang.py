"""A stand-in for an SGLang server, for tests: the part of SGLang's native API that NPD's served
teacher uses (``npd.teacher.api=sglang``), in SGLang's layout (described, with SGLang's file and
line, in ``verl_npd/rollout/teacher_api.py``), answered with a real model's scores computed by
``npd_cpu`` (SGLang itself needs CUDA packages to install).

``python tests/fake_sglang.py MODEL_DIR --port N [--served-model-name NAME]``, loopback only.
Endpoints: ``POST /generate`` (``input_ids`` one list or a batch, ``sampling_params``,
``return_logprob``, ``logprob_start_len`` 0, ``top_logprobs_num``, ``return_text_in_logprobs``
false), ``GET /health``, ``GET /v1/models``, ``POST /tokenize``. Anything else is refused with
SGLang's error shape, so a client that asks for more than this layout fails the test.
"""

import argparse
import asyncio
import contextlib
import math
import uuid

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

ACCEPTED = {"input_ids", "sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs"}


def _logprob(value: float):
    # SGLang's answers go through orjson, which writes -inf as null (utils/json_response.py:17).
    return value if math.isfinite(value) else None


def sglang_meta_info(sequence: list[int], extra_fields: dict, top_logprobs_num: int, vocab_size: int) -> dict:
    """npd_cpu's prompt scores (verl's layout: row t scores token t+1) in SGLang's layout: row i
    scores token i, the first row's log-prob null."""
    from verl_npd.engines.prompt_logprobs import PROMPT_TOKEN_LOGPROBS

    own = extra_fields[PROMPT_TOKEN_LOGPROBS]
    # SGLang writes 0 for ids at the end of its vocabulary (logprob_result_processor.py:52-56).
    ids = [t if t < vocab_size - 1 else 0 for t in sequence]
    meta = {
        "id": uuid.uuid4().hex,
        "finish_reason": {"type": "length", "length": 0},
        "prompt_tokens": len(sequence),
        "completion_tokens": 0,
        "input_token_logprobs": [[None, ids[0], None]] + [[_logprob(own[t]), ids[t + 1], None] for t in range(len(sequence) - 1)],
        "output_token_logprobs": [],
    }
    if top_logprobs_num > 0:
        meta["input_top_logprobs"] = [None] + [
            [[_logprob(lp), token, None] for token, lp in zip(row_ids, row_lps, strict=True)]
            for row_ids, row_lps in zip(extra_fields["prompt_ids"][:-1], extra_fields["prompt_logprobs"][:-1], strict=True)
        ]
        meta["output_top_logprobs"] = []
    return meta


def build_app(model_dir: str, served_name: str) -> FastAPI:
    from verl.workers.config import HFModelConfig, RolloutConfig
    from verl.workers.rollout.replica import RolloutMode

    from verl_npd.engines.cpu_server import CPURolloutServer

    server = CPURolloutServer(
        config=RolloutConfig(name="npd_cpu", load_format="auto"),
        model_config=HFModelConfig(path=model_dir),
        rollout_mode=RolloutMode.STANDALONE,
        replica_rank=0,
    )
    tokenizer = server.model_config.tokenizer
    vocab_size = server.model_config.hf_config.vocab_size

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.launch_server()
        yield

    app = FastAPI(lifespan=lifespan)

    def error(message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message}}, status_code=400)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": served_name, "object": "model", "root": served_name}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await request.json()
        tokens = tokenizer.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
        return {"tokens": tokens, "count": len(tokens), "max_model_len": server.config.max_model_len}

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.json()
        unknown = set(body) - ACCEPTED
        if unknown:
            return error(f"this fake does not implement {sorted(unknown)}")
        if body.get("logprob_start_len") != 0 or not body.get("return_logprob") or body.get("return_text_in_logprobs"):
            return error("this fake answers return_logprob with logprob_start_len 0, without text, only")
        if body.get("sampling_params") != {"max_new_tokens": 0, "temperature": 1.0}:
            return error(f"this fake answers prefill-only requests only, got {body.get('sampling_params')}")
        single = isinstance(body["input_ids"][0], int)
        batch = [body["input_ids"]] if single else body["input_ids"]
        k = int(body.get("top_logprobs_num") or 0)
        params = {"max_tokens": 1, "temperature": 1.0, "prompt_logprobs": k}
        outputs = await asyncio.gather(*[server.generate(list(s), dict(params), uuid.uuid4().hex) for s in batch])
        answers = [
            {"text": "", "output_ids": [], "meta_info": sglang_meta_info(s, o.extra_fields, k, vocab_size)}
            for s, o in zip(batch, outputs, strict=True)
        ]
        return Response(msgspec.json.encode(answers[0] if single else answers), media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", default="default")
    args = parser.parse_args()
    import uvicorn

    uvicorn.run(build_app(args.model_dir, args.served_model_name), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

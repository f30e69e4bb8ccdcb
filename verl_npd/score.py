"""Offline Δ-IFD scoring of a (prompt, response) dataset with a teacher and a student.

    python -m verl_npd.score --teacher T_DIR --student S_DIR --data in.jsonl --out scored.jsonl

The student plays the behaviour model B (the one that wrote the responses); ``--behaviour``
names a separate behaviour snapshot, which ``--mode student_lag`` needs. For each model M it
computes the four terms of docs/algorithm.md: s_M(y|x) from a forward over the chat-templated prompt
followed by the response tokens, s_M(y) from a forward over the assistant header followed by the
same tokens (``verl_npd.filters.ifd``), then IFD, Δ-IFD and the filter's decision per row.

The response y is tokenized as the rollout would have produced it: the text's tokens, then the
chat template's end-of-turn token (``<|im_end|>`` for Qwen), which the student generated and
which is part of its response in the online pipeline (``--no-end-of-turn`` leaves it out). Every
model is fed the student tokenizer's ids, as verl feeds the teacher the student's tokens, so the
two tokenizers must have the same vocabulary.

Output: every input row and column, plus ``ifd_teacher``, ``ifd_student`` (``ifd_behaviour``),
``delta_ifd``, ``response_tokens``, ``keep`` and ``drop_reason`` (null when kept; undefined scores
are null), in the format of ``--out``'s extension; a summary with the ``npd/*`` metrics is printed
and written to ``<out>.summary.json``. Bad input ends with a one-line error and exit code 2.
"""

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from verl_npd.dataset_cli import (
    InputError,
    check_columns,
    check_model_dir,
    check_out,
    naming,
    one_line,
    read_table,
    run_command,
    to_messages,
    write_table,
)
from verl_npd.tokenizers import TokenizerError, check_shared_token_ids, load_tokenizer

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m verl_npd.score", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("--teacher", required=True, help="teacher model directory (HF format, with tokenizer)")
    parser.add_argument("--student", required=True, help="student model directory; also the behaviour model")
    parser.add_argument("--behaviour", help="behaviour snapshot that wrote the responses, if not the student")
    parser.add_argument("--data", required=True, help="input .jsonl or .parquet")
    parser.add_argument("--out", required=True, help="output .jsonl or .parquet (format by extension)")
    parser.add_argument("--prompt-column", default="prompt", help="chat messages list, or text (a user turn)")
    parser.add_argument("--response-column", default="response", help="response text")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    parser.add_argument(
        "--max-length", type=int, help="truncate each response so that prompt+response fits (default: no limit)"
    )
    parser.add_argument("--mode", default="teacher_minus_behaviour", help="Δ-IFD mode (see verl_npd.filters.ifd)")
    parser.add_argument("--band", choices=("quantile", "absolute"), default="quantile", help="filter band type")
    parser.add_argument("--lo", type=float, help="band low end (default 0.05 for quantile; required for absolute)")
    parser.add_argument("--hi", type=float, help="band high end (default 0.95 for quantile; required for absolute)")
    parser.add_argument("--drop-teacher-ifd-ge-1", action="store_true", help="also drop rows with teacher IFD >= 1")
    parser.add_argument("--no-filter", action="store_true", help="keep every row (scores and quantiles only)")
    parser.add_argument("--no-end-of-turn", action="store_true", help="do not append the end-of-turn token to y")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model/tokenizer code from the paths")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.max_length is not None and args.max_length < 2:
        parser.error("--max-length must be >= 2")
    if args.band == "absolute" and (args.lo is None or args.hi is None):
        parser.error("--band absolute needs both --lo and --hi")
    if args.mode == "student_lag" and args.behaviour is None:
        parser.error("--mode student_lag needs --behaviour (the snapshot that wrote the responses)")
    return args


# ---------------------------------------------------------------------------------------------
# Response text
# ---------------------------------------------------------------------------------------------


def to_response(value, row: int, column: str) -> str:
    where = f"row {row} (0-based), column {column!r}"
    if value is None:
        raise InputError(f"{where}: missing response")
    if not isinstance(value, str):
        raise InputError(f"{where}: expected response text, got {type(value).__name__}")
    if not value.strip():
        raise InputError(f"{where}: empty response")
    return value


# ---------------------------------------------------------------------------------------------
# Tokenizers and models
# ---------------------------------------------------------------------------------------------


def end_of_turn_id(tokenizer) -> int:
    """The special token that closes an assistant turn in the chat template (``<|im_end|>`` for Qwen).

    Rendered from a conversation whose assistant turn holds a sentinel: the first token after the
    sentinel is the one the model emits to stop.
    """
    from verl_npd.filters.ifd import ChatTemplateError

    sentinel = "NPD-SENTINEL-RESPONSE"
    conversation = [{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel}]
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
    if sentinel not in text:
        raise ChatTemplateError("the chat template drops the assistant turn, so its end-of-turn token is unknown")
    suffix_ids = tokenizer.encode(text.split(sentinel, 1)[1], add_special_tokens=False)
    special_ids = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    if not suffix_ids or suffix_ids[0] not in special_ids:
        raise ChatTemplateError(
            "the chat template does not close an assistant turn with a special token; pass --no-end-of-turn"
        )
    return suffix_ids[0]


@dataclass
class Encoded:
    """Token ids per row: the chat-templated prompt and the response y."""

    prompts: list[list[int]]
    responses: list[list[int]]
    truncated_rows: int

    @property
    def max_token_id(self) -> int:
        return max(max(ids, default=0) for ids in self.prompts + self.responses)


def encode_rows(tokenizer, messages: list[list[dict]], responses: list[str], args) -> Encoded:
    """Token ids as at generation: chat-templated prompt ids, then the response's own ids."""
    from verl_npd.filters.ifd import render_chat_ids

    eot = [] if args.no_end_of_turn else [end_of_turn_id(tokenizer)]
    prompt_ids = [render_chat_ids(tokenizer, m, add_generation_prompt=True) for m in messages]
    response_ids = [tokenizer.encode(r, add_special_tokens=False) for r in responses]
    # A response whose text already ends with the end-of-turn token must not get a second one.
    response_ids = [ids if ids[-len(eot) :] == eot else ids + eot for ids in response_ids] if eot else response_ids
    truncated = 0
    if args.max_length is not None:
        # Both terms score the same truncated y, so the ratio stays well defined.
        for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
            budget = max(args.max_length - len(p), 0)
            if len(r) > budget:
                response_ids[i], truncated = r[:budget], truncated + 1
    return Encoded(prompt_ids, response_ids, truncated)


def load_model(path: str, flag: str, args, max_token_id: int):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, args.dtype), trust_remote_code=args.trust_remote_code
        )
    except Exception as e:  # missing weights, unknown architecture, remote code refused, ...
        raise InputError(f"{flag} {path}: cannot load the model: {one_line(e)}") from None
    # An id beyond the embedding table would crash the forward with an index error.
    num_embeddings = model.get_input_embeddings().num_embeddings
    if max_token_id >= num_embeddings:
        raise InputError(
            f"{flag} {path}: the model embeds {num_embeddings} tokens, but the data uses token id {max_token_id}"
        )
    return model.to(args.device).eval()


def score_model(role: str, path: str, encoded: Encoded, info, args, bar):
    """IFDScores of one model: conditional and unconditional forwards over all rows."""
    from verl_npd.filters.ifd import (
        ifd_from_nll,
        mean_token_nll,
        response_logprobs,
        unconditional_response_logprobs,
    )

    model = load_model(path, f"--{role}", args, encoded.max_token_id)
    bar.set_description(f"{role} s(y|x)")
    cond = response_logprobs(
        model,
        encoded.prompts,
        encoded.responses,
        pad_token_id=info.pad_token_id,
        batch_size=args.batch_size,
        progress=bar.update,
    )
    bar.set_description(f"{role} s(y)")
    uncond = unconditional_response_logprobs(
        model, info, encoded.responses, batch_size=args.batch_size, progress=bar.update
    )
    del model  # free it before the next model loads
    return ifd_from_nll(mean_token_nll(*cond), mean_token_nll(*uncond))


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    data, out = Path(args.data), Path(args.out)
    check_out(out)
    models = {"teacher": args.teacher, "student": args.student}
    if args.behaviour is not None:
        models["behaviour"] = args.behaviour
    for role, path in models.items():
        check_model_dir(path, f"--{role}")

    table = read_table(data)
    check_columns(table, args.prompt_column, args.response_column)
    messages = [to_messages(v, i, args.prompt_column) for i, v in enumerate(table.column(args.prompt_column))]
    responses = [to_response(v, i, args.response_column) for i, v in enumerate(table.column(args.response_column))]

    # Imported only now, so that input errors come back without the torch/transformers start-up.
    import torch
    from tqdm.auto import tqdm

    from verl_npd.filters.delta_ifd import DeltaIFDFilter

    config = filter_config(args)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: CUDA is not available on this machine")
    info, encoded = tokenize(models, messages, responses, args)

    scores = {}
    scored_rows = sum(1 for r in encoded.responses if r)
    with tqdm(total=2 * len(models) * scored_rows, unit="seq", file=sys.stderr) as bar:
        for role, path in models.items():
            scores[role] = score_model(role, path, encoded, info, args, bar)
    scores.setdefault("behaviour", scores["student"])
    decision = DeltaIFDFilter(config)(**scores)

    new_columns = {f"ifd_{role}": _nullable(scores[role].ifd, scores[role].valid) for role in models}
    new_columns |= {
        "delta_ifd": _nullable(decision.delta.values, decision.delta.valid),
        "response_tokens": [len(r) for r in encoded.responses],
        "keep": decision.keep.tolist(),
        "drop_reason": [None if r == "kept" else r for r in decision.reasons],
    }
    write_table(table, out, new_columns)
    summary = {
        "data": str(data),
        "out": str(out),
        **models,
        "rows": table.num_rows,
        "kept": int(decision.keep.sum()),
        "truncated_rows": encoded.truncated_rows,
        "filter": asdict(config),
        "band": decision.band,
        **decision.metrics,
    }
    Path(f"{out}.summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def tokenize(models: dict[str, str], messages: list[list[dict]], responses: list[str], args):
    """(TokenizerInfo, Encoded) from the student tokenizer, after checking the others match it."""
    from verl_npd.filters.ifd import ChatTemplateError, TokenizerInfo

    tokenizers = {}
    for role, path in models.items():
        with naming(f"--{role}"):
            tokenizers[role] = load_tokenizer(path, args.trust_remote_code)
    student_tokenizer = tokenizers.pop("student")
    for role, tokenizer in tokenizers.items():
        try:
            check_shared_token_ids(tokenizer, student_tokenizer, f"--{role}", "--student")
        except TokenizerError as e:
            raise InputError(str(e)) from None
    try:
        info = TokenizerInfo.from_tokenizer(student_tokenizer)
        return info, encode_rows(student_tokenizer, messages, responses, args)
    except ChatTemplateError as e:
        raise InputError(f"--student {args.student}: {e}") from None


def filter_config(args: argparse.Namespace):
    from verl_npd.filters.delta_ifd import DeltaIFDFilterConfig

    overrides = {"enabled": not args.no_filter, "mode": args.mode, "band": args.band}
    overrides |= {"drop_teacher_ifd_ge_1": args.drop_teacher_ifd_ge_1}
    overrides |= {k: getattr(args, k) for k in ("lo", "hi") if getattr(args, k) is not None}
    try:
        return DeltaIFDFilterConfig(**overrides)
    except ValueError as e:
        # The config names its fields npd.filter.<field>; here they are command-line flags.
        raise InputError(str(e).replace("npd.filter.", "--")) from None


def _nullable(values, valid) -> list:
    """Scores as floats, None where undefined (JSON null / parquet null, never NaN)."""
    return [float(v) if ok and math.isfinite(v) else None for v, ok in zip(values.tolist(), valid.tolist())]


def main(argv: list[str] | None = None) -> int:
    return run_command(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())

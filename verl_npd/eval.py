"""Score a model on a verl dataset, as verl's validation scores it.

    python -m verl_npd.eval --model DIR --data FILE.parquet [--out results.parquet]

Each row's ``prompt`` (chat messages, or text as one user turn) is rendered with the model's chat
template and answered greedily (verl's ``val_kwargs``: temperature 0), at most
``--max-new-tokens`` tokens. The answer, decoded without special tokens, is scored against
``reward_model.ground_truth`` as verl's validation scores it: by verl's own scorers, selected by
``data_source`` (GSM8K, MATH, ...; see ``verl.utils.reward_score.default_compute_score``), or by the
function a config gives verl as ``reward.custom_reward_function`` (``--reward-path``/``--reward-name``;
the toy task's is ``pkg://verl_npd.toy.reward``). A student written by a verl-npd run records the
function its run validated with (``reward_function.json`` beside the weights), which is the default
for it. A row's accuracy is what verl's core validation
metric averages: the score's ``acc`` when the scorer reports one, else the score.

Generation: ``npd_cpu`` (verl-npd's batched CPU engine, fp32, as the toy's rollout) or vLLM's
offline engine; ``--engine auto`` takes vLLM where it is installed and a GPU is present.

Output: every input row and column plus ``response``, ``score`` and ``acc``, in the format of
``--out``'s extension (default ``<data>.eval.jsonl`` beside the data); the accuracy, overall and per
data source, is printed and written to ``<out>.summary.json``. Bad input ends with a one-line
error and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections import defaultdict, deque
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
from verl_npd.tokenizers import load_tokenizer
from verl_npd.trainer.student_export import REWARD_FUNCTION_FILE

ENGINES = ("auto", "npd_cpu", "vllm")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m verl_npd.eval", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("--model", required=True, help="model directory (HF format, with tokenizer and chat template)")
    parser.add_argument("--data", required=True, help="verl dataset, .parquet or .jsonl")
    parser.add_argument("--out", help="per-row results, .jsonl or .parquet (default: <data>.eval.jsonl)")
    parser.add_argument("--prompt-column", default="prompt", help="chat messages list, or text (a user turn)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=1024, help="tokens per answer at most (verl's data.max_response_length)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="sequences generated together (npd_cpu)")
    parser.add_argument("--engine", choices=ENGINES, default="auto", help="auto: vllm if installed with a GPU")
    parser.add_argument(
        "--chat-template-kwargs",
        type=json.loads,
        default={},
        help='JSON object for the chat template (verl\'s data.apply_chat_template_kwargs), e.g. \'{"enable_thinking": false}\'',
    )
    parser.add_argument(
        "--reward-path",
        help="module of the score function, as verl's reward.custom_reward_function.path (e.g. "
        "pkg://verl_npd.toy.reward); default: the one the run that wrote --model validated with "
        f"(its {REWARD_FUNCTION_FILE}), else verl's scorers by data_source",
    )
    parser.add_argument(
        "--reward-name", default="compute_score", help="the function in --reward-path (reward.custom_reward_function.name)"
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model/tokenizer code from the path")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if not isinstance(args.chat_template_kwargs, dict):
        parser.error("--chat-template-kwargs must be a JSON object")
    return args


def reward_inputs(table) -> tuple[list[str], list[str], list[dict]]:
    """Per row: data source, ground truth and extra_info, as verl's reward manager passes them."""
    check_columns(table, "data_source", "reward_model")
    extra_infos = table.column("extra_info") if "extra_info" in table.columns else [None] * table.num_rows
    ground_truths = []
    for row, reward_model in enumerate(table.column("reward_model")):
        if not isinstance(reward_model, dict) or reward_model.get("ground_truth") is None:
            raise InputError(f"row {row} (0-based), column 'reward_model': no ground_truth")
        ground_truths.append(reward_model["ground_truth"])
    return table.column("data_source"), ground_truths, [dict(e or {}) for e in extra_infos]


def score_function(args: argparse.Namespace):
    """``--reward-path``'s function (loaded as verl loads ``reward.custom_reward_function``), else the
    one a verl-npd run validated the model with (written beside its weights), else verl's scorers by
    data source."""
    path, name, source = args.reward_path, args.reward_name, f"--reward-path {args.reward_path}"
    recorded = os.path.join(args.model, REWARD_FUNCTION_FILE)
    if path is None and os.path.isfile(recorded):
        with open(recorded) as f:
            reward_function = json.load(f)
        path, name, source = reward_function["path"], reward_function["name"], f"{recorded}: {reward_function['path']}"
    if path is None:
        from verl.utils.reward_score import default_compute_score

        return default_compute_score
    from verl.utils.import_utils import load_extern_object

    try:
        return load_extern_object(path, name)
    except Exception as e:  # noqa: BLE001 - a missing module or function is reported with where it was named
        raise InputError(f"{source} --reward-name {name}: {one_line(e)}") from None


def check_scorers(compute_score, data_sources: list[str]) -> None:
    """Fail before generating when a data source has no scorer (verl raises NotImplementedError)."""
    for source in sorted(set(data_sources)):
        try:
            compute_score(source, "", "0")
        except NotImplementedError:
            raise InputError(
                f"data_source {source!r} has no scorer in verl.utils.reward_score; name its score function with "
                "--reward-path (as the config's reward.custom_reward_function.path)"
            ) from None


def row_accuracy(result) -> float:
    """What verl's core validation metric averages (its naive reward manager: ``acc``, else the score)."""
    if isinstance(result, dict):
        return float(result.get("acc", result["score"]))
    return float(result)


def choose_engine(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "vllm" if importlib.util.find_spec("vllm") and torch.cuda.is_available() else "npd_cpu"


def generate_npd_cpu(args, tokenizer, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy answers from the npd_cpu engine: continuous batching, fp32, as the toy's rollout."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM
    from verl.utils.model import get_generation_config

    from verl_npd.engines.cpu_engine import BatchedEngine, SamplingSpec, Sequence, eos_token_ids

    try:
        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=torch.float32, attn_implementation="sdpa", trust_remote_code=args.trust_remote_code
        ).eval()
    except Exception as e:  # missing weights, unknown architecture, remote code refused, ...
        raise InputError(f"--model {args.model}: cannot load the model: {one_line(e)}") from None
    engine = BatchedEngine(
        model,
        eos_token_ids=eos_token_ids(tokenizer, get_generation_config(args.model, args.trust_remote_code)),
        max_num_seqs=args.batch_size,
        max_num_batched_tokens=args.batch_size * max(len(p) for p in prompts),
        logprobs_mode="raw_logprobs",
        seed=0,
        num_valid_tokens=len(tokenizer),
    )
    spec = SamplingSpec.from_request({"temperature": 0.0}, max_tokens=args.max_new_tokens, vocab_size=engine.vocab_size)
    waiting = deque(Sequence(request_id=str(i), prompt_ids=p, spec=spec) for i, p in enumerate(prompts))
    answers: list[list[int]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), unit="row", desc="npd_cpu", file=sys.stderr) as bar:
        while waiting or engine.num_running:
            for seq in engine.step(engine.take_prefill_group(waiting)):
                answers[int(seq.request_id)] = seq.output_ids
                bar.update(1)
    return answers


def generate_vllm(args, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy answers from vLLM's offline engine (its own progress bar)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, trust_remote_code=args.trust_remote_code)
    outputs = llm.generate(
        prompts=[{"prompt_token_ids": p} for p in prompts],
        sampling_params=SamplingParams(temperature=0, max_tokens=args.max_new_tokens),
        use_tqdm=True,
    )
    return [list(output.outputs[0].token_ids) for output in outputs]


def run(args: argparse.Namespace) -> dict:
    from verl_npd.filters.ifd import render_chat_ids

    data = Path(args.data)
    out = Path(args.out) if args.out else data.with_name(data.stem + ".eval.jsonl")
    check_out(out)
    check_model_dir(args.model, "--model")
    table = read_table(data)
    check_columns(table, args.prompt_column)
    messages = [to_messages(v, i, args.prompt_column) for i, v in enumerate(table.column(args.prompt_column))]
    data_sources, ground_truths, extra_infos = reward_inputs(table)
    compute_score = score_function(args)
    check_scorers(compute_score, data_sources)

    with naming("--model"):
        tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    try:
        prompts = [render_chat_ids(tokenizer, m, add_generation_prompt=True, **args.chat_template_kwargs) for m in messages]
    except Exception as e:  # no chat template, a template error, unknown kwargs
        raise InputError(f"--model {args.model}: cannot render the prompts with its chat template: {one_line(e)}") from None
    engine = choose_engine(args.engine)
    answers = generate_vllm(args, prompts) if engine == "vllm" else generate_npd_cpu(args, tokenizer, prompts)

    responses = [tokenizer.decode(ids, skip_special_tokens=True) for ids in answers]
    results = [
        compute_score(source, response, truth, extra)
        for source, response, truth, extra in zip(data_sources, responses, ground_truths, extra_infos)
    ]
    accuracies = [row_accuracy(r) for r in results]
    scores = [float(r["score"]) if isinstance(r, dict) else float(r) for r in results]
    write_table(table, out, {"response": responses, "score": scores, "acc": accuracies})

    by_source = defaultdict(list)
    for source, accuracy in zip(data_sources, accuracies):
        by_source[source].append(accuracy)
    summary = {
        "model": args.model,
        "data": str(data),
        "out": str(out),
        "engine": engine,
        "rows": len(accuracies),
        "accuracy": sum(accuracies) / len(accuracies),
        "accuracy_by_data_source": {s: sum(v) / len(v) for s, v in sorted(by_source.items())},
    }
    Path(f"{out}.summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> int:
    return run_command(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())

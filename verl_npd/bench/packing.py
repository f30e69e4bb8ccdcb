"""Packed vs padded micro-batching for the NPD packed-SFT step: forward + loss + backward.

Both methods train on the same samples (prompt + long-tailed response, lognormal lengths) with the
same tiny-to-small Qwen2 student, the same synthetic teacher top-k and the default NPD loss
(forward KL on the teacher's top-k, normalised by the global number of loss tokens):

- packed: best-fit-decreasing bins of at most ``--budget`` tokens, each run as one row with
  restarting positions and no attention mask, the layout verl's remove-padding forward gives the
  model (transformers then attends within each sample only; verl_npd/trainer/packing.py says how);
- padded: fixed-size micro-batches in arrival order, right-padded to the longest sample of each
  micro-batch (verl without dynamic batch size). The default micro-batch size,
  ``round(budget / mean sample length)``, gives the padded micro-batches the packed ones' *average* real
  token count, so the two differ only in padding and in how tokens are grouped.

Reported: packing efficiency (and first-fit's, for reference), padding fraction, wall-clock per step,
real tokens/s, and the padded/packed time ratio, all measured in one run, alternating the two
methods per repeat. The loss of both methods is also compared: it must agree.

The CPU defaults are scaled down to run in about a minute on 2 cores (about two when another process
competes for them): 128 samples of median ~33 prompt + ~100 response tokens with a lognormal tail
(sigma 1) up to the 1024-token budget, and a 1.45M-parameter Qwen2 (hidden 128, 2 layers, vocab 4096).
What matters for packing is the shape of the length distribution relative to the budget, which is
kept realistic; on a GPU, scale everything up.

    python -m verl_npd.bench.packing                  # writes outputs/bench/packing_cpu.json
    python -m verl_npd.bench.packing --device cuda --out outputs/bench/packing_cuda.json \
        --num-samples 1024 --budget 8192 --prompt-mu 5 --response-mu 6.5 --hidden 1024 --layers 8 --vocab 32768

The reference CPU result is docs/benchmarks/packing/packing_cpu.json (written by this benchmark when
it was benchmarks/bench_packing.py, with its default settings).
"""

import argparse
import json
import math
import platform
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from verl_npd.losses.distill import NPDLossConfig, per_token_distillation_loss, reduce_token_loss
from verl_npd.trainer.packing import best_fit_decreasing, packing_efficiency

# NPD's default loss (distillation.distillation_loss.loss_mode=npd_forward_kl_topk).
LOSS_MODE = "forward_kl_topk"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m verl_npd.bench.packing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--budget", type=int, default=1024, help="token budget per packed micro-batch")
    parser.add_argument("--prompt-mu", type=float, default=3.5, help="lognormal mu of prompt lengths (median e^mu)")
    parser.add_argument("--prompt-sigma", type=float, default=0.5)
    parser.add_argument("--response-mu", type=float, default=4.6, help="lognormal mu of response lengths")
    parser.add_argument("--response-sigma", type=float, default=1.0, help="lognormal sigma: the long tail")
    parser.add_argument(
        "--padded-micro-batch-size", type=int, default=None, help="default: round(budget / mean sample length)"
    )
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--topk", type=int, default=32, help="teacher top-k per token")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per method, alternating methods")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads. 1 by default: on a shared 2-core machine OpenMP's barriers make 2 threads up to "
        "10x slower than 1 as soon as another process competes for a core",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/bench/packing_cpu.json")
    return parser.parse_args()


def response_loss_mask(prompt_length: int, sequence_length: int) -> torch.Tensor:
    """Which positions' predictions are trained: those of the response tokens, made at positions
    ``prompt_length - 1`` to ``sequence_length - 2`` (the last position predicts nothing in the sample)."""
    mask = torch.zeros(sequence_length, dtype=torch.bool)
    mask[prompt_length - 1 : sequence_length - 1] = True
    return mask


@dataclass
class PackedRow:
    """One bin's samples concatenated into one row; ``tensors`` holds each per-token tensor, concatenated."""

    tensors: dict[str, torch.Tensor]
    position_ids: torch.Tensor
    """Positions restarting at 0 for every sample."""
    target_ids: torch.Tensor
    """The next token of each position within its own sample (0 at every sample's last position)."""

    def to(self, device: str) -> "PackedRow":
        return PackedRow({k: v.to(device) for k, v in self.tensors.items()}, self.position_ids.to(device),
                         self.target_ids.to(device))


def pack_row(samples: list[dict[str, torch.Tensor]], indices: list[int]) -> PackedRow:
    chosen = [samples[i] for i in indices]
    tensors = {key: torch.cat([s[key] for s in chosen]) for key in chosen[0]}
    positions = torch.cat([torch.arange(s["input_ids"].shape[0]) for s in chosen])
    targets = torch.cat([torch.cat([s["input_ids"][1:], s["input_ids"].new_zeros(1)]) for s in chosen])
    return PackedRow(tensors, positions, targets)


def make_samples(args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    """Prompt + response samples with a synthetic teacher top-k (distinct ids, 90% top-k mass)."""
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    samples = []
    for _ in range(args.num_samples):
        prompt = max(1, int(rng.lognormvariate(args.prompt_mu, args.prompt_sigma)))
        response = max(1, int(rng.lognormvariate(args.response_mu, args.response_sigma)))
        prompt = min(prompt, args.budget // 2)
        length = min(prompt + response, args.budget)  # truncate the response, as max_response_length would
        base = torch.randint(0, args.vocab, (length, 1), generator=gen)
        stride = torch.randint(1, args.vocab // args.topk, (length, 1), generator=gen)
        ids = (base + stride * torch.arange(args.topk)) % args.vocab
        log_probs = torch.log_softmax(2.0 * torch.randn(length, args.topk, generator=gen), -1) + math.log(0.9)
        samples.append(
            {
                "input_ids": torch.randint(0, args.vocab, (length,), generator=gen),
                "loss_mask": response_loss_mask(prompt, length),
                "teacher_topk_ids": ids,
                "teacher_topk_log_probs": log_probs,
            }
        )
    return samples


def padded_micro_batches(samples, size: int, device: str) -> list[dict[str, torch.Tensor]]:
    batches = []
    for start in range(0, len(samples), size):
        group = samples[start : start + size]
        width = max(s["input_ids"].shape[0] for s in group)
        topk = group[0]["teacher_topk_ids"].shape[-1]
        batch = {
            "input_ids": torch.zeros(len(group), width, dtype=torch.long),
            "attention_mask": torch.zeros(len(group), width, dtype=torch.long),
            "loss_mask": torch.zeros(len(group), width, dtype=torch.bool),
            "target_ids": torch.zeros(len(group), width, dtype=torch.long),
            "teacher_topk_ids": torch.zeros(len(group), width, topk, dtype=torch.long),
            "teacher_topk_log_probs": torch.zeros(len(group), width, topk),
        }
        for row, s in enumerate(group):
            n = s["input_ids"].shape[0]
            batch["input_ids"][row, :n] = s["input_ids"]
            batch["attention_mask"][row, :n] = 1
            batch["loss_mask"][row, : n - 1] = s["loss_mask"][: n - 1]
            batch["target_ids"][row, : n - 1] = s["input_ids"][1:]
            batch["teacher_topk_ids"][row, :n] = s["teacher_topk_ids"]
            batch["teacher_topk_log_probs"][row, :n] = s["teacher_topk_log_probs"]
        batch["position_ids"] = torch.arange(width).expand(len(group), width).contiguous()
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_packed(model, packed_batches, config, global_tokens, device) -> tuple[float, float]:
    synchronize(device)
    start = time.perf_counter()
    total = 0.0
    for packed in packed_batches:
        logits = model(
            input_ids=packed.tensors["input_ids"].unsqueeze(0),
            position_ids=packed.position_ids.unsqueeze(0),
            attention_mask=None,
            use_cache=False,
        ).logits.squeeze(0)
        tensors = packed.tensors
        loss = per_token_distillation_loss(
            logits, tensors["teacher_topk_ids"], tensors["teacher_topk_log_probs"], LOSS_MODE, config, packed.target_ids
        ).loss
        loss = reduce_token_loss(loss, tensors["loss_mask"], global_tokens)
        loss.backward()
        total += loss.item()
    synchronize(device)
    return time.perf_counter() - start, total


def run_padded(model, batches, config, global_tokens, device) -> tuple[float, float]:
    synchronize(device)
    start = time.perf_counter()
    total = 0.0
    for batch in batches:
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits
        loss = per_token_distillation_loss(
            logits, batch["teacher_topk_ids"], batch["teacher_topk_log_probs"], LOSS_MODE, config, batch["target_ids"]
        ).loss
        loss = reduce_token_loss(loss, batch["loss_mask"], global_tokens)
        loss.backward()
        total += loss.item()
    synchronize(device)
    return time.perf_counter() - start, total


def main() -> None:
    args = parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = args.device
    samples = make_samples(args)
    lengths = [s["input_ids"].shape[0] for s in samples]
    real_tokens = sum(lengths)
    global_tokens = sum(int(s["loss_mask"].sum()) for s in samples)

    bins = best_fit_decreasing(lengths, args.budget)
    efficiency = packing_efficiency(lengths, bins, args.budget)
    first_fit_bins: list[int] = []  # first-fit in arrival order, for reference only
    for length in lengths:
        for b, room in enumerate(first_fit_bins):
            if room >= length:
                first_fit_bins[b] -= length
                break
        else:
            first_fit_bins.append(args.budget - length)
    first_fit_efficiency = real_tokens / (len(first_fit_bins) * args.budget)
    packed_batches = [pack_row(samples, b).to(device) for b in bins]

    mb_size = args.padded_micro_batch_size or max(1, round(args.budget / statistics.mean(lengths)))
    padded_batches = padded_micro_batches(samples, mb_size, device)
    padded_slots = sum(b["input_ids"].numel() for b in padded_batches)

    head_dim = args.hidden // args.heads
    model_config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        head_dim=head_dim,
        max_position_embeddings=max(args.budget, 2048),
        attn_implementation="sdpa",
    )
    dtype = getattr(torch, args.dtype)
    model = Qwen2ForCausalLM(model_config).to(device=device, dtype=dtype)
    model.train()
    loss_config = NPDLossConfig()

    runners = {"packed": (run_packed, packed_batches), "padded": (run_padded, padded_batches)}
    for runner, batches in runners.values():  # warm-up: allocator, kernels, transformers' mask paths
        runner(model, batches[:2], loss_config, global_tokens, device)
    times: dict[str, list[float]] = {"packed": [], "padded": []}
    losses: dict[str, float] = {}
    for repeat in range(args.repeats):
        for name in ("packed", "padded") if repeat % 2 == 0 else ("padded", "packed"):
            model.zero_grad(set_to_none=True)
            runner, batches = runners[name]
            elapsed, losses[name] = runner(model, batches, loss_config, global_tokens, device)
            times[name].append(elapsed)

    results = {}
    for name, micro_batches, slots in (
        ("packed", len(packed_batches), real_tokens),
        ("padded", len(padded_batches), padded_slots),
    ):
        step_s = statistics.median(times[name])
        results[name] = {
            "micro_batches": micro_batches,
            "token_slots_computed": slots,
            "padding_fraction": 1.0 - real_tokens / slots,
            "step_time_s_median": step_s,
            "step_time_s_min": min(times[name]),
            "step_time_s_all": times[name],
            "real_tokens_per_s": real_tokens / step_s,
            "us_per_real_token": 1e6 * step_s / real_tokens,
            "loss": losses[name],
        }
    results["packed"]["packing_efficiency"] = efficiency
    sorted_lengths = sorted(lengths)
    report = {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "host": platform.node(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "args": vars(args),
        "model": {"params": sum(p.numel() for p in model.parameters()), "attn": "sdpa", "dtype": args.dtype},
        "samples": {
            "count": len(lengths),
            "real_tokens": real_tokens,
            "loss_tokens": global_tokens,
            "length_mean": statistics.mean(lengths),
            "length_p50": sorted_lengths[len(lengths) // 2],
            "length_p95": sorted_lengths[int(0.95 * (len(lengths) - 1))],
            "length_max": sorted_lengths[-1],
        },
        "packing_efficiency": efficiency,
        "first_fit_efficiency": first_fit_efficiency,
        "padded_micro_batch_size": mb_size,
        "results": results,
        "time_ratio_padded_over_packed": (
            results["padded"]["step_time_s_median"] / results["packed"]["step_time_s_median"]
        ),
        # The fastest repeat is the least disturbed by other processes on a shared machine.
        "time_ratio_padded_over_packed_min": (
            results["padded"]["step_time_s_min"] / results["packed"]["step_time_s_min"]
        ),
        "loss_relative_difference": abs(losses["packed"] - losses["padded"]) / abs(losses["padded"]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))

    print(
        f"{len(lengths)} samples, {real_tokens} tokens (mean {report['samples']['length_mean']:.0f}, "
        f"p95 {report['samples']['length_p95']}, max {report['samples']['length_max']}), budget {args.budget}, "
        f"{report['model']['params'] / 1e6:.2f}M-param Qwen2 on {report['device']}"
    )
    print(f"packing efficiency: best-fit decreasing {efficiency:.2%}, first-fit {first_fit_efficiency:.2%}")
    print(f"{'method':<8}{'micro-batches':>14}{'padding':>10}{'step s':>10}{'tokens/s':>12}{'us/token':>10}")
    for name, r in results.items():
        print(
            f"{name:<8}{r['micro_batches']:>14}{r['padding_fraction']:>10.1%}{r['step_time_s_median']:>10.2f}"
            f"{r['real_tokens_per_s']:>12.0f}{r['us_per_real_token']:>10.1f}"
        )
    print(
        f"padded / packed wall-clock: {report['time_ratio_padded_over_packed']:.2f}x (median), "
        f"{report['time_ratio_padded_over_packed_min']:.2f}x (fastest repeats); "
        f"loss packed {losses['packed']:.6f} vs padded {losses['padded']:.6f} -> {out}"
    )


if __name__ == "__main__":
    main()

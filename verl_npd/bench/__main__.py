"""``python -m verl_npd.bench [--mini] [--steps N] [--seeds N] [--methods a,b] [--threads auto|N,M] [--out DIR]
[--gpu-recipe DIR --teacher-accuracy A] [--allow-dirty] [--resume]``"""

import argparse
import dataclasses
import sys

from verl_npd.bench.methods import DEFAULT_METHODS, METHOD_NAMES, select_methods
from verl_npd.bench.runner import Benchmark, CannotResume, reference_results_dir, source_state
from verl_npd.bench.settings import GPU_RECIPE, TOY_FULL, TOY_MINI, Recipe


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m verl_npd.bench",
        description="Compare NPD with verl's built-in on-policy distillation (sync, separate_async, fully_async, "
        "colocate_async), SFT on teacher responses, NPD ablations and NPD with a served teacher on the same task, "
        "hardware, budget and seeds; writes results.json, results.md and plots.",
    )
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated methods to run, in this order (default: the reference run's "
        f"{','.join(DEFAULT_METHODS)}; known: {','.join(METHOD_NAMES)})",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help=f"optimizer steps per run (default: {TOY_FULL.steps} on the toy, {TOY_MINI.steps} with --mini, "
        "the recipe's own with --gpu-recipe)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        help=f"runs per method, with seeds 1..N, the same for every method (default: {TOY_FULL.seeds}; "
        f"{TOY_MINI.seeds} with --mini)",
    )
    parser.add_argument(
        "--threads",
        default="auto",
        help="torch threads per process to try for each method before its seeds run, the fastest kept: "
        "'auto' (the default) tries the default share of the cores and all of them, except with --mini, "
        "which tries nothing; a comma-separated list tries those; one number sets it without a trial",
    )
    parser.add_argument("--trial-steps", type=int, default=20, help="steps of each thread trial (default: 20)")
    parser.add_argument("--out", default="outputs/bench", help="output directory (default: outputs/bench)")
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="write into docs/benchmarks/ although the checkout has local changes (the results record it)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="go on with the benchmark stopped in --out (the same arguments otherwise): its thread trials and "
        "finished runs are kept and the rest of its runs made, if the package, recipes and setup.py are those "
        "it ran (a later commit that changed only other files may) and every setting is the same",
    )
    parser.add_argument(
        "--teacher-accuracy",
        type=float,
        help="the teacher's validation accuracy for --gpu-recipe (measure it with python -m verl_npd.eval); "
        "without it a GPU recipe has no target and nothing is timed (the toy measures its teacher itself)",
    )
    parser.add_argument(
        "--mini",
        action="store_true",
        help="smoke-test size: 2 steps of 16 prompts, 32 validation prompts, validated before and after, one seed",
    )
    parser.add_argument(
        "--gpu-recipe",
        metavar="DIR",
        help="a GPU recipe folder with config/npd.yaml and config/opd_baseline.yaml "
        "(e.g. recipes/qwen3_1.7b_from_8b_gsm8k_math) instead of the CPU toy world; no SFT run "
        "(untested, see docs/benchmarks/README.md)",
    )
    args = parser.parse_args(argv)
    if args.gpu_recipe and args.mini:
        parser.error("--mini is the toy world's smoke-test size; use --steps with --gpu-recipe")
    if args.teacher_accuracy is not None and not args.gpu_recipe:
        parser.error("--teacher-accuracy is for --gpu-recipe; the toy measures its teacher itself")
    if args.teacher_accuracy is not None and not 0 < args.teacher_accuracy <= 1:
        parser.error(f"--teacher-accuracy must lie in (0, 1], got {args.teacher_accuracy}")
    for name in ("steps", "seeds", "trial_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.threads != "auto":
        try:
            args.threads = [int(t) for t in args.threads.split(",")]
        except ValueError:
            parser.error(f"--threads must be 'auto' or comma-separated numbers, got {args.threads!r}")
        if min(args.threads) < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    recipe = Recipe.gpu(args.gpu_recipe) if args.gpu_recipe else Recipe.toy_cpu()
    scale = GPU_RECIPE if args.gpu_recipe else (TOY_MINI if args.mini else TOY_FULL)
    if args.steps is not None:
        scale = dataclasses.replace(scale, steps=args.steps)
    if args.seeds is not None:
        scale = dataclasses.replace(scale, seeds=args.seeds)
    methods = select_methods([name.strip() for name in args.methods.split(",") if name.strip()])
    if reference_results_dir(args.out) and not args.allow_dirty:
        source = source_state(args.out)
        if source["local_changes"]:
            print(
                f"verl_npd.bench: {args.out} is under docs/benchmarks/, where results must come from committed "
                f"code, but the checkout has local changes ({', '.join(source['changed_files'])}); commit them, "
                "or pass --allow-dirty (the results then record it)",
                file=sys.stderr,
            )
            return 2
    threads = None if args.mini and args.threads == "auto" else args.threads
    benchmark = Benchmark(
        recipe,
        scale,
        methods,
        args.out,
        threads=threads,
        trial_steps=args.trial_steps,
        teacher_accuracy=args.teacher_accuracy,
        resume=args.resume,
    )
    try:
        results = benchmark.run()
    except CannotResume as e:
        print(f"verl_npd.bench: {e}", file=sys.stderr)
        return 2
    failed = [name for name, m in results["methods"].items() if m["status"] == "failed"]
    if failed:
        print(f"failed: {', '.join(failed)} (see their run.log)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

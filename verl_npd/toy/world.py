"""ensure_toy_world(): build the toy distillation world once, then reuse it from the cache.

Layout of a world directory (default ``$VERL_NPD_HOME/toy-v1``, else ``~/.cache/verl_npd/toy-v1``):

    tokenizer/            HF fast tokenizer (shared by both models)
    teacher/, student/    complete HF model dirs (config, safetensors, generation config, tokenizer)
    data/train.parquet    distillation prompts in verl's RL dataset format
    data/val.parquet      held-out prompts, same format
    world.json            manifest, written last

A world is built in a temporary sibling directory and renamed into place, so a directory at the
world path is always complete; concurrent callers serialise on an ``flock`` next to it and the
losers reuse the winner's build. The cached path imports neither torch nor transformers.
"""

import fcntl
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from verl_npd.toy.config import BuildConfig
from verl_npd.toy.task import ABILITY, DATA_SOURCE, Problem, generate_problems

WORLD_NAME = "toy-v1"
MANIFEST = "world.json"
_BUILDING_INFIX = ".building-"


@dataclass(frozen=True)
class ToyWorld:
    """Absolute paths of a built world, and the val accuracies measured when it was built."""

    root: str
    tokenizer_dir: str
    teacher_dir: str
    student_dir: str
    train_parquet: str
    val_parquet: str
    teacher_accuracy: float
    student_accuracy: float


def default_root() -> str:
    """``$VERL_NPD_HOME/toy-v1``, or ``~/.cache/verl_npd/toy-v1`` when the variable is unset."""
    home = os.environ.get("VERL_NPD_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "verl_npd")
    return os.path.join(home, WORLD_NAME)


def ensure_toy_world(root: str | None = None, *, quiet: bool = False) -> ToyWorld:
    """Return the toy world at ``root`` (the world directory itself), building it on first use.

    Building takes a few CPU minutes; later calls only read the manifest. Safe to call from several
    processes at once.
    """
    root = os.path.abspath(os.path.expanduser(root or default_root()))
    world = _load(root)
    if world is not None:
        return world
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    with open(root + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if we crash
        world = _load(root)  # another process may have built it while we waited
        if world is not None:
            return world
        _remove_leftovers(root)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + _BUILDING_INFIX, dir=parent)
        try:
            build_world(tmp, BuildConfig(), quiet=quiet)
            _fsync_tree(tmp)  # the rename must not reach the disk before the files do
            os.rename(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _load(root)


def _fsync_tree(path: str) -> None:
    """Flush every file under ``path`` to disk."""
    for directory, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _load(root: str) -> ToyWorld | None:
    """The world at ``root`` from its manifest, or None when there is no manifest yet."""
    try:
        with open(os.path.join(root, MANIFEST)) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return None
    paths = {key: os.path.join(root, rel) for key, rel in manifest["paths"].items()}
    return ToyWorld(
        root=root,
        **paths,
        teacher_accuracy=manifest["teacher"]["accuracy"],
        student_accuracy=manifest["student"]["accuracy"],
    )


def _remove_leftovers(root: str) -> None:
    """Delete temp dirs of builds that crashed (we hold the lock, so none is running).

    An empty directory at ``root`` (e.g. made by a test harness) is removed; any other
    manifest-less directory there was not made by us, so we refuse to touch it.
    """
    for stale in glob.glob(glob.escape(root) + _BUILDING_INFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    if os.path.isdir(root):
        if os.listdir(root):
            raise FileExistsError(f"{root} exists but holds no {MANIFEST}; it is not a toy world, remove it")
        os.rmdir(root)


def manifest_of(world: ToyWorld) -> dict:
    """The full manifest (build config, parameter counts, timings) of a built world."""
    with open(os.path.join(world.root, MANIFEST)) as f:
        return json.load(f)


def read_problems(parquet_path: str) -> tuple[list[str], list[str]]:
    """(prompts, ground-truth answers) of a world parquet, e.g. to call ``evaluate_accuracy``."""
    import pandas as pd

    frame = pd.read_parquet(parquet_path)
    prompts = [messages[-1]["content"] for messages in frame["prompt"]]
    answers = [reward_model["ground_truth"] for reward_model in frame["reward_model"]]
    return prompts, answers


def write_parquet(problems: list[Problem], split: str, path: str) -> None:
    """Rows in verl's RL dataset format (as in verl's examples/data_preprocess/gsm8k.py)."""
    import pandas as pd

    rows = [
        {
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": p.prompt}],
            "ability": ABILITY,
            "reward_model": {"style": "rule", "ground_truth": p.answer},
            "extra_info": {"split": split, "index": i, "response": p.response},
        }
        for i, p in enumerate(problems)
    ]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pd.DataFrame(rows).to_parquet(path, index=False)


def build_world(out_dir: str, config: BuildConfig, *, quiet: bool = False) -> dict:
    """Build every file of a world into ``out_dir`` (manifest last) and return the manifest.

    Low-level: no locking and no atomic rename; use :func:`ensure_toy_world`.
    """
    import torch
    from transformers import AutoTokenizer

    from verl_npd.toy.models import count_parameters, evaluate_accuracy, new_model, train_sft
    from verl_npd.toy.tokenizer import build_tokenizer

    def log(message: str) -> None:
        if not quiet:
            print(f"[verl_npd.toy] {message}", file=sys.stderr, flush=True)

    start = time.time()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(min(config.num_threads, os.cpu_count() or 1))
    try:
        log(f"building the toy world in {out_dir} (a few minutes, once)")
        paths = {
            "tokenizer_dir": "tokenizer",
            "teacher_dir": "teacher",
            "student_dir": "student",
            "train_parquet": "data/train.parquet",
            "val_parquet": "data/val.parquet",
        }
        build_tokenizer(os.path.join(out_dir, paths["tokenizer_dir"]))
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(out_dir, paths["tokenizer_dir"]))

        sft_problems = generate_problems(config.n_sft_problems, config.seed, "train")
        # One draw for val and dev keeps them disjoint (generate_problems never repeats a problem).
        held_out = generate_problems(config.n_val_prompts + config.n_dev_prompts, config.seed, "val")
        val_problems, dev_problems = held_out[: config.n_val_prompts], held_out[config.n_val_prompts :]
        write_parquet(sft_problems[: config.n_train_prompts], "train", os.path.join(out_dir, paths["train_parquet"]))
        write_parquet(val_problems, "val", os.path.join(out_dir, paths["val_parquet"]))

        def accuracy_on(problems: list[Problem], model) -> float:
            return evaluate_accuracy(model, tokenizer, [p.prompt for p in problems], [p.answer for p in problems])

        manifest = {"name": WORLD_NAME, "data_source": DATA_SOURCE, "config": asdict(config), "paths": paths}
        # Distinct seeds so the student is not a scaled-down copy of the teacher's init.
        for role, spec, seed in (("teacher", config.teacher, config.seed + 1), ("student", config.student, config.seed + 2)):
            role_start = time.time()

            def reached_target(model, target=spec.target_accuracy) -> bool:
                return accuracy_on(dev_problems, model) >= target

            model = new_model(spec.shape, tokenizer, seed=seed)
            losses = train_sft(
                model, tokenizer, sft_problems, steps=spec.max_steps, batch_size=spec.batch_size, lr=spec.lr,
                warmup_steps=spec.warmup_steps, final_lr_fraction=spec.final_lr_fraction, seed=seed,
                stop_when=None if spec.target_accuracy is None else reached_target, desc=f"toy {role}", quiet=quiet,
            )  # fmt: skip
            train_seconds = time.time() - role_start
            accuracy = accuracy_on(val_problems, model)
            model_dir = os.path.join(out_dir, paths[f"{role}_dir"])
            model.save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
            manifest[role] = {
                "accuracy": accuracy,
                "parameters": count_parameters(model),
                "steps": len(losses),
                "final_loss": losses[-1],
                "train_seconds": round(train_seconds, 1),
            }
            log(
                f"{role}: {count_parameters(model):,} parameters, {len(losses)} steps in {train_seconds:.0f}s, "
                f"val accuracy {accuracy:.3f}"
            )

        manifest["build_seconds"] = round(time.time() - start, 1)
        with open(os.path.join(out_dir, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
        log(f"built in {manifest['build_seconds']:.0f}s")
        return manifest
    finally:
        torch.set_num_threads(previous_threads)

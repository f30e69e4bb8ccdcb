"""``python -m verl_npd.toy [ROOT]``: build (or load) the toy world and print a summary."""

import os
import sys
import time

from verl_npd.toy.world import ensure_toy_world, manifest_of


def _megabytes(path: str) -> float:
    if os.path.isfile(path):
        return os.path.getsize(path) / 1e6
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 1e6


def main() -> None:
    start = time.time()
    world = ensure_toy_world(sys.argv[1] if len(sys.argv) > 1 else None)
    elapsed = time.time() - start
    manifest = manifest_of(world)
    print(f"toy world {manifest['name']} at {world.root} (ready in {elapsed:.1f}s)")
    for key in ("tokenizer_dir", "teacher_dir", "student_dir", "train_parquet", "val_parquet"):
        path = getattr(world, key)
        print(f"  {key:14s} {path}  ({_megabytes(path):.2f} MB)")
    config = manifest["config"]
    for role in ("teacher", "student"):
        info, shape = manifest[role], config[role]["shape"]
        print(
            f"  {role}: {info['parameters']:,} params (hidden {shape['hidden_size']}, {shape['num_layers']} layers, "
            f"{shape['num_heads']} heads x {shape['head_dim']}), val accuracy {info['accuracy']:.3f}, "
            f"trained {info['steps']} steps in {info['train_seconds']:.0f}s"
        )
    print(f"  rows: train {config['n_train_prompts']}, val {config['n_val_prompts']}; data_source {manifest['data_source']}")
    print(f"  build time {manifest['build_seconds']:.0f}s")


if __name__ == "__main__":
    main()

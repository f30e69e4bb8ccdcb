"""A second toy teacher with a tokenizer of its own, to distil across tokenizers
(``npd.cross_tokenizer``; config ``npd_toy_cross``).

Where the toy world's tokenizer writes every digit as a token and uses ChatML, this one:

* merges digit pairs: every two-digit string is one token ("47", "55"; "133" is "1" "33"), so
  most of a response's numbers are one teacher token and two student tokens (spans);
* writes "Compute " and "Answer: " (with their spaces) as one token each, where the student has
  "Compute" and "Answer" ":" " ";
* has its own chat template, Phi-3's layout with a BOS: ``<s><|user|>\\n...<|end|>\\n<|assistant|>\\n``,
  ``<|end|>`` closing a turn;
* spells any other printable ASCII character byte by byte, so it can re-tokenise anything the student
  writes (its special tokens included, as text).

The teacher is another family too: a Granite model (Llama's layers; transformers loads its tokenizer
as saved, where a Qwen2 model directory re-applies Qwen's digit-splitting pre-tokenizer), the toy
teacher's size, trained the same way on the same problems.

    from verl_npd.toy.cross import ensure_cross_teacher
    teacher = ensure_cross_teacher()   # built on first use (about two CPU minutes), then cached
    teacher.teacher_dir, teacher.tokenizer_dir, teacher.teacher_accuracy

Cached in ``$VERL_NPD_HOME/toy-cross-v1`` (default ``~/.cache/verl_npd/toy-cross-v1``) beside the toy
world, built the same way (a temporary directory renamed into place, under a lock).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

from verl_npd.toy.config import BuildConfig
from verl_npd.toy.tokenizer import _byte_level_symbol
from verl_npd.toy.world import _fsync_tree, default_root, ensure_toy_world

CROSS_NAME = "toy-cross-v1"
MANIFEST = "teacher.json"
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "<|end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, "<|system|>", "<|user|>", "<|assistant|>"]
UNK_TOKEN = "[UNK]"
WORDS = ["Compute ", "Answer: "]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# The toy world teacher's shape and schedule, with a seed of its own and longer: predicting a
# two-digit result as one token of a hundred is harder than digit by digit (600 steps: 88%).
SEED_OFFSET = 11
MAX_STEPS = 1500


@dataclass(frozen=True)
class CrossTeacher:
    """Absolute paths of the built teacher and its validation accuracy (on the toy world's val set)."""

    root: str
    tokenizer_dir: str
    teacher_dir: str
    teacher_accuracy: float


def build_cross_tokenizer(out_dir: str) -> None:
    """Byte-level BPE over printable ASCII, with a merge for every digit pair (module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = [chr(c) for c in range(0x20, 0x7F)] + ["\n"]
    symbols = [_byte_level_symbol(c) for c in characters]
    digits = "0123456789"
    pairs = [a + b for a in digits for b in digits]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + [UNK_TOKEN] + symbols + pairs)}
    # GPT-2's pre-tokenizer keeps a run of digits together ("133"), and the merges pair them up.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(p[0], p[1]) for p in pairs], unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.add_tokens([AddedToken(word, normalized=False) for word in WORDS])
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        model_max_length=128,
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(out_dir)


def new_granite_model(shape, tokenizer, seed: int):
    """A freshly initialised float32 Granite model of ``shape`` (a :class:`ModelShape`), whose
    multipliers make it a plain Llama (attention scaled by 1/sqrt(head_dim))."""
    import torch
    from transformers import GenerationConfig, GraniteConfig, GraniteForCausalLM

    torch.manual_seed(seed)
    config = GraniteConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        attention_multiplier=shape.head_dim**-0.5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        architectures=["GraniteForCausalLM"],
    )
    model = GraniteForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    return model


def default_cross_root() -> str:
    return os.path.join(os.path.dirname(default_root()), CROSS_NAME)


def ensure_cross_teacher(root: str | None = None, *, quiet: bool = False) -> CrossTeacher:
    """The cross-tokenizer teacher at ``root``, built on first use (the toy world too, if needed)."""
    root = os.path.abspath(os.path.expanduser(root or default_cross_root()))
    teacher = _load(root)
    if teacher is not None:
        return teacher
    world = ensure_toy_world(quiet=quiet)
    os.makedirs(os.path.dirname(root), exist_ok=True)
    with open(root + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        teacher = _load(root)
        if teacher is not None:
            return teacher
        if os.path.isdir(root):
            if os.listdir(root):
                raise FileExistsError(f"{root} exists but holds no {MANIFEST}; it is not a toy teacher, remove it")
            os.rmdir(root)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".building-", dir=os.path.dirname(root))
        try:
            _build(tmp, world, BuildConfig(), quiet=quiet)
            _fsync_tree(tmp)
            os.rename(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _load(root)


def _load(root: str) -> CrossTeacher | None:
    try:
        with open(os.path.join(root, MANIFEST)) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return None
    return CrossTeacher(
        root=root,
        tokenizer_dir=os.path.join(root, "tokenizer"),
        teacher_dir=os.path.join(root, "teacher"),
        teacher_accuracy=manifest["accuracy"],
    )


def _build(out_dir: str, world, config: BuildConfig, *, quiet: bool) -> None:
    import torch
    from transformers import AutoTokenizer

    from verl_npd.toy.models import count_parameters, evaluate_accuracy, train_sft
    from verl_npd.toy.task import generate_problems
    from verl_npd.toy.world import read_problems

    def log(message: str) -> None:
        if not quiet:
            print(f"[verl_npd.toy.cross] {message}", file=sys.stderr, flush=True)

    start = time.time()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(min(config.num_threads, os.cpu_count() or 1))
    try:
        log(f"building the cross-tokenizer toy teacher in {out_dir} (a few minutes, once)")
        tokenizer_dir, teacher_dir = os.path.join(out_dir, "tokenizer"), os.path.join(out_dir, "teacher")
        build_cross_tokenizer(tokenizer_dir)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        # The toy world's own SFT problems (same draw) and validation prompts.
        problems = generate_problems(config.n_sft_problems, config.seed, "train")
        val_prompts, val_answers = read_problems(world.val_parquet)
        spec, seed = replace(config.teacher, max_steps=MAX_STEPS), config.seed + SEED_OFFSET
        model = new_granite_model(spec.shape, tokenizer, seed)
        losses = train_sft(
            model, tokenizer, problems, steps=spec.max_steps, batch_size=spec.batch_size, lr=spec.lr,
            warmup_steps=spec.warmup_steps, final_lr_fraction=spec.final_lr_fraction, seed=seed,
            desc="toy cross teacher", quiet=quiet,
        )  # fmt: skip
        accuracy = evaluate_accuracy(model, tokenizer, val_prompts, val_answers)
        model.save_pretrained(teacher_dir)
        tokenizer.save_pretrained(teacher_dir)
        manifest = {
            "name": CROSS_NAME,
            "accuracy": accuracy,
            "parameters": count_parameters(model),
            "steps": len(losses),
            "final_loss": losses[-1],
            "build_seconds": round(time.time() - start, 1),
            "train_spec": asdict(spec),
        }
        with open(os.path.join(out_dir, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
        log(
            f"{manifest['parameters']:,} parameters, val accuracy {accuracy:.3f}, "
            f"built in {manifest['build_seconds']:.0f}s"
        )
    finally:
        torch.set_num_threads(previous_threads)

"""Tiny, local, deterministic Qwen2 models and a byte-level BPE chat tokenizer for tests.

No model hub here, so tests build what they need on disk: a tokenizer trained with the
`tokenizers` library on a small fixed corpus (byte-level, so any text encodes without unknown
tokens), wrapped as a Hugging Face fast tokenizer with a Qwen2.5-style ChatML template, and a random
Qwen2 (hidden 64, 2 heads x head_dim 32) whose vocabulary is exactly the tokenizer's.

This is a helper module, not a conftest: import it explicitly (``from tests.tiny_models import ...``
or ``from tiny_models import ...`` with ``tests/`` on the path).
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, "<|im_start|>", EOS_TOKEN]

# Qwen2.5's ChatML layout, including its habit of injecting a default system turn when the
# conversation has none: the response-alone (unconditional IFD) input must not pick that up.
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CORPUS = [
    "You are a helpful assistant.",
    "What is two plus two? Two plus two is four.",
    "The quick brown fox jumps over the lazy dog.",
    "Name a colour. Blue is a colour, and so is red.",
    "Write a short poem about the sea: waves roll in, waves roll out.",
    "system user assistant",
] * 4


def build_tiny_tokenizer(
    out_dir: str | Path, vocab_size: int = 320, chat_template: str = QWEN_CHAT_TEMPLATE
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer of ``vocab_size`` tokens, save it to ``out_dir``, return it.

    Deterministic for a given ``vocab_size``; different sizes give different vocabularies (useful
    to test tokenizer-mismatch checks).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, chat_template=chat_template
    )
    hf_tokenizer.save_pretrained(str(out_dir))
    return hf_tokenizer


def build_tiny_qwen2(
    out_dir: str | Path | None,
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> Qwen2ForCausalLM:
    """A random float32 Qwen2 (2 heads x head_dim hidden/2), in eval mode; saved to ``out_dir`` if given.

    ``initializer_range`` is 0.2 rather than Qwen's 0.02 so that the random model is far from
    uniform and its log-probs actually depend on the context (IFD tests need that contrast).
    """
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=hidden // 2,
        max_position_embeddings=512,
        initializer_range=0.2,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        dtype="float32",
        architectures=["Qwen2ForCausalLM"],
    )
    model = Qwen2ForCausalLM(config).eval()
    if out_dir is not None:
        model.generation_config = GenerationConfig(eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        model.save_pretrained(str(out_dir))
    return model

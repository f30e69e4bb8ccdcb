"""A character-level tokenizer for the toy task, built with `tokenizers` and saved as a HF fast tokenizer.

Digits are single tokens (so arithmetic is learnable digit by digit); a few words ("Compute",
"Answer", chat roles) are single tokens so prompts and responses stay short. The chat template is
Qwen's ChatML layout, with <|im_end|> as end-of-sequence, so verl's agent loop and vLLM treat these
models like any Qwen2 chat model.
"""

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, "<|im_start|>", EOS_TOKEN]
UNK_TOKEN = "[UNK]"
WORDS = ["Compute", "Answer", "system", "user", "assistant"]
# Anything else a tokenizer round-trip could meet in prompts, responses and the chat template.
CHARACTERS = list("0123456789+-=.:") + [" ", "\n"]

# ChatML without Qwen's default system prompt (the vocabulary could not spell it anyway).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _byte_level_symbol(char: str) -> str:
    """The symbol GPT-2/Qwen byte-level BPE uses for a one-byte character (' ' -> 'Ġ', '\\n' -> 'Ċ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte = ord(char)
    if byte in printable:
        return char
    return chr(256 + [b for b in range(256) if b not in printable].index(byte))


def build_tokenizer(out_dir: str) -> None:
    """Build the tokenizer and save it to ``out_dir`` in HF format (tokenizer.json + config).

    Why byte-level BPE with no merges rather than a plain word-level vocabulary: transformers 5
    loads the tokenizer of a ``qwen2`` model directory as ``Qwen2Tokenizer`` whatever
    tokenizer_config.json says, and that class re-applies Qwen's byte-level pre-tokenizer. A vocabulary
    of byte-level symbols survives that unchanged (verl's agent loop, for one, needs "\\n" to be a
    single token). The few words are added tokens, matched before pre-tokenization.
    """
    from transformers import PreTrainedTokenizerFast  # heavy import, only needed when building

    symbols = [_byte_level_symbol(c) for c in CHARACTERS]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + [UNK_TOKEN] + symbols)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.add_tokens([AddedToken(word, normalized=False) for word in WORDS])

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",  # generation batches are left-padded
        model_max_length=128,
        chat_template=CHAT_TEMPLATE,
    )
    hf_tokenizer.save_pretrained(out_dir)

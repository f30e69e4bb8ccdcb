"""Tiny Qwen2 teacher/student: configs, a plain-torch SFT loop and batched greedy evaluation."""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from verl_npd.toy.config import ModelShape
from verl_npd.toy.task import Problem, extract_answer


def make_config(shape: ModelShape, tokenizer: PreTrainedTokenizerBase) -> Qwen2Config:
    """A float32 Qwen2 config whose vocabulary is exactly the tokenizer's."""
    assert shape.hidden_size == shape.num_heads * shape.head_dim, shape
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=128,
        # Untied: with a 26-token vocabulary tying saves nothing, and untied weights need no special
        # case in weight syncs to rollout engines (vLLM CPU builds have mishandled tied reloads).
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        architectures=["Qwen2ForCausalLM"],
    )


def new_model(shape: ModelShape, tokenizer: PreTrainedTokenizerBase, seed: int) -> Qwen2ForCausalLM:
    """A freshly initialised model (seeded)."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(make_config(shape, tokenizer))
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def render_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[str]:
    """Each prompt as chat-template text ending in the assistant generation prompt."""
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    return tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)


def tokenize_problems(tokenizer: PreTrainedTokenizerBase, problems: list[Problem]) -> list[tuple[list[int], int]]:
    """(token ids of templated prompt + response + EOS, number of prompt tokens) per problem.

    Renders and tokenizes in whole batches: per-item ``apply_chat_template(tokenize=True)`` costs
    about 1 ms each, which would dominate a training step of the tiny models.
    """
    texts = render_prompts(tokenizer, [p.prompt for p in problems])
    prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(
        [t + p.response + tokenizer.eos_token for t, p in zip(texts, problems)], add_special_tokens=False
    )["input_ids"]
    return [(ids, len(p_ids)) for ids, p_ids in zip(full_ids, prompt_ids)]


def collate_sft(rows: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, loss_mask); the loss covers response tokens and EOS."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        loss_mask[i, n_prompt : len(ids)] = 1.0
    return input_ids, attention_mask, loss_mask


def sft_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens of a batch from ``collate_sft``."""
    input_ids, attention_mask, loss_mask = batch
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets, mask = input_ids[:, 1:], loss_mask[:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return (losses * mask.reshape(-1)).sum() / mask.sum()


def train_sft(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    final_lr_fraction: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.98),
    seed: int = 0,
    stop_when: Callable[[torch.nn.Module], bool] | None = None,
    check_every: int = 10,
    desc: str = "sft",
    quiet: bool = False,
) -> list[float]:
    """AdamW SFT on (prompt, response) pairs; returns the loss of every step taken.

    The lr warms up linearly over ``warmup_steps``, then decays by a cosine to
    ``final_lr_fraction * lr`` at ``steps``. AdamW has weight decay 0.01 and ``betas`` (verl's
    default actor optimizer is the same with betas (0.9, 0.999)). Batches are drawn with
    replacement from ``problems`` by a generator seeded with ``seed``. When ``stop_when`` is given,
    it is called (model in eval mode) every ``check_every`` steps and training stops the first time
    it returns True.
    """
    rows = tokenize_problems(tokenizer, problems)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return lr * (final_lr_fraction + (1 - final_lr_fraction) * cosine)

    generator = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=quiet, mininterval=1.0)
    for step in bar:
        model.train()
        idx = torch.randint(len(rows), (batch_size,), generator=generator).tolist()
        batch = collate_sft([rows[i] for i in idx], tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = sft_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if stop_when is not None and (step + 1) % check_every == 0:
            model.eval()
            if stop_when(model):
                break
    bar.close()
    model.eval()
    return losses


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    batch_size: int = 256,
    max_new_tokens: int = 40,
) -> list[str]:
    """Greedy completions of ``prompts`` (chat-templated, left-padded batches), special tokens removed."""
    model.eval()
    completions = []
    for start in range(0, len(prompts), batch_size):
        texts = render_prompts(tokenizer, prompts[start : start + batch_size])
        rows = tokenizer(texts, add_special_tokens=False)["input_ids"]
        width = max(map(len, rows))
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        completions += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return completions


def evaluate_accuracy(
    model_dir_or_model: str | torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    answers: list[str],
    batch_size: int = 256,
) -> float:
    """Exact-match accuracy of greedy answers (the extracted "Answer: N") against ``answers``."""
    model = model_dir_or_model
    if isinstance(model, str):
        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    completions = greedy_generate(model, tokenizer, prompts, batch_size=batch_size)
    return sum(extract_answer(c) == a for c, a in zip(completions, answers)) / len(answers)

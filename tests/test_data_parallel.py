"""Data-parallel NPD: the batch the trainer sends reaches every rank as exactly the bins packed for it,
and one update on 2 FSDP ranks equals the update on 1 rank and a plain-torch reference."""

import random
from dataclasses import dataclass

import pytest
import torch

from verl_npd.rollout.async_manager import GeneratedSample, PromptItem
from verl_npd.trainer.config import PackingConfig
from verl_npd.trainer.near_policy_trainer import train_packed

TOPK = 8


def synthetic_samples(seed: int, count: int, vocab: int, max_prompt: int, max_response: int) -> list[GeneratedSample]:
    """Samples as the rollout manager hands them to the trainer, with random tokens and a random
    (but valid: a log-softmax top-k, vLLM layout) teacher top-k."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for position in range(count):
        p, r = rng.randint(2, max_prompt), rng.randint(1, max_response)
        teacher_lp, teacher_ids = torch.log_softmax(3 * torch.randn(p + r, vocab, generator=gen), -1).topk(TOPK)
        samples.append(
            GeneratedSample(
                prompt=PromptItem(position=position, prompt_ids=[rng.randrange(vocab) for _ in range(p)],
                                  routing_key=None, extra={}),
                response_ids=[rng.randrange(vocab) for _ in range(r)],
                rollout_log_probs=[-rng.uniform(0.0, 3.0) for _ in range(r)],
                version=0,
                teacher_topk_ids=teacher_ids.int(),
                teacher_topk_log_probs=teacher_lp,
                teacher_cond=[], teacher_uncond=[], behaviour_uncond=[],
            )
        )
    return samples


class RecordingActor:
    """Stands in for the actor worker group: splits the batch as verl's dispatch does for
    ``update_actor`` and micro-batches each rank's chunk with the (patched) engine function."""

    def __init__(self, data_parallel_size: int):
        self.data_parallel_size = data_parallel_size
        self.micro_batches: list[list] = []

    def update_actor(self, batch_td):
        from tensordict import TensorDict
        from verl.single_controller.base.decorator import _split_args_kwargs_data_proto
        from verl.utils import tensordict_utils as tu
        from verl.workers.engine import utils as engine_utils

        # verl/single_controller/base/decorator.py: dispatch_nd_compute_dataproto splits with this.
        (chunks,), _ = _split_args_kwargs_data_proto(self.data_parallel_size, batch_td)
        for chunk in chunks:
            # train_mini_batch (verl/workers/engine_workers.py): one mini-batch of mini_batch_size / dp.
            per_rank = tu.get(chunk, "mini_batch_size") // self.data_parallel_size
            (mini_batch,) = list(tu.make_iterator(chunk, per_rank, epochs=1, dataloader_kwargs={"shuffle": False}))
            micro_batches, _ = engine_utils.prepare_micro_batches(mini_batch, dp_group=None)
            self.micro_batches.append(micro_batches)
        output = TensorDict({}, batch_size=[])
        tu.assign_non_tensor(output, metrics={"loss": [0.0]})
        return output


@pytest.mark.parametrize("data_parallel_size", [1, 2, 3])
def test_each_rank_trains_exactly_its_bins(data_parallel_size):
    import verl  # noqa: F401  (loads the plugin, which patches prepare_micro_batches)

    samples = synthetic_samples(0, 12 * data_parallel_size, vocab=40, max_prompt=20, max_response=30)
    actor = RecordingActor(data_parallel_size)
    packed = train_packed(
        actor, samples, data_parallel_size=data_parallel_size, pad_id=0,
        packing=PackingConfig(token_budget=64), temperature=1.0, seed=0,
    )
    assert len(actor.micro_batches) == len(packed.rank_bins) == data_parallel_size
    assert len(packed.rank_bins[0]) > 1  # several micro-batches per rank
    for rank_micro_batches, bins in zip(actor.micro_batches, packed.rank_bins):
        assert len(rank_micro_batches) == len(bins)
        for micro_batch, bin_ in zip(rank_micro_batches, bins):
            got = [ids.tolist() for ids in micro_batch["input_ids"].unbind()]
            expected = [samples[i].prompt.prompt_ids + samples[i].response_ids for i in bin_]
            assert got == expected
            assert sum(map(len, got)) <= 64
            topk = [t.tolist() for t in micro_batch["teacher_ids"].unbind()]
            assert topk == [samples[i].teacher_topk_ids.tolist() for i in bin_]


# ----------------------------------------------------------------------------------------------
# One update on 1 and on 2 FSDP ranks (verl's real actor workers, Ray, gloo)
# ----------------------------------------------------------------------------------------------
LR = 0.5
BUDGET = 96


def actor_config(student_dir: str):
    """The toy demo's actor (main_npd's default config), with plain SGD (no clipping): the weights after one step are
    then w - lr * gradient, which a reference can compute directly. (Adam's first step is about
    lr * sign(gradient), blind to how the loss is scaled.)"""
    from conftest import TOY_CONFIG, compose

    return compose(
        *TOY_CONFIG,
        [
            f"actor_rollout_ref.model.path={student_dir}",
            "actor_rollout_ref.actor.optim.optimizer=SGD",
            f"actor_rollout_ref.actor.optim.lr={LR}",
            "actor_rollout_ref.actor.optim.clip_grad=1e9",
            "actor_rollout_ref.actor.optim.total_training_steps=1",
            "actor_rollout_ref.actor.checkpoint.save_contents=[hf_model]",
        ],
    )


def update_on_ranks(config, samples, ranks: int, out_dir) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One ``train_packed`` step on a fresh actor worker group of ``ranks`` FSDP ranks; returns the
    student's weights after it (from verl's own HF checkpoint) and the step's metrics."""
    import ray
    from safetensors.torch import load_file
    from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
    from verl.workers.engine_workers import ActorRolloutRefWorker

    pool = RayResourcePool(process_on_nodes=[ranks], use_gpu=True, max_colocate_count=1, name_prefix=f"dp{ranks}")
    worker = RayClassWithInitArgs(
        cls=ray.remote(ActorRolloutRefWorker),
        config=config.actor_rollout_ref,
        distillation_config=config.distillation,
        role="actor",
    )
    group = RayWorkerGroup(resource_pool=pool, ray_cls_with_init=worker, device_name="cpu")
    group.init_model()
    packed = train_packed(
        group, samples, data_parallel_size=ranks, pad_id=0,
        packing=PackingConfig(token_budget=BUDGET), temperature=1.0, seed=0,
    )
    group.save_checkpoint(str(out_dir), None, 1)
    weights = load_file(str(out_dir / "huggingface" / "model.safetensors"))
    for actor in group.workers:
        ray.kill(actor)
    return weights, packed


@dataclass
class ReferenceStep:
    weights: dict[str, torch.Tensor]
    loss: float
    grad_norm: float
    drift: float
    """mean over response tokens of log p_behaviour - log p_student (npd/drift_kl)."""


def reference_update(student_dir: str, samples, loss_name: str, topk: int) -> ReferenceStep:
    """Plain torch, one process, no packing: every sample's loss summed over its response tokens,
    divided by the response tokens of the whole batch; one SGD step."""
    from transformers import AutoModelForCausalLM

    from verl_npd.losses.distill import per_token_distillation_loss
    from verl_npd.losses.verl_registration import loss_config_for

    model = AutoModelForCausalLM.from_pretrained(student_dir, torch_dtype=torch.float32, attn_implementation="sdpa")
    loss_config = loss_config_for(loss_name, topk)
    total, drift = torch.zeros(()), 0.0
    tokens = sum(len(s.response_ids) for s in samples)
    for s in samples:
        ids = torch.tensor(s.prompt.prompt_ids + s.response_ids)
        p, length = len(s.prompt.prompt_ids), len(ids)
        logits = model(input_ids=ids.unsqueeze(0)).logits[0]
        # Response token j (at p + j) is predicted at p + j - 1; teacher entry t scores token t + 1.
        scored = slice(p - 1, length - 1)
        per_token = per_token_distillation_loss(
            logits[scored], s.teacher_topk_ids[scored], s.teacher_topk_log_probs[scored], loss_config,
            target_ids=ids[p:],
        ).loss
        total = total + per_token.sum()
        student = torch.log_softmax(logits[scored].detach(), -1).gather(-1, ids[p:, None]).squeeze(-1)
        drift += (torch.tensor(s.rollout_log_probs) - student).sum().item()
    loss = total / tokens
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None))
    weights = {name: (p - LR * p.grad).detach() for name, p in model.named_parameters()}
    return ReferenceStep(weights=weights, loss=loss.item(), grad_norm=grad_norm.item(), drift=drift / tokens)


def test_one_update_is_the_same_on_one_and_two_ranks(toy_world, tmp_path):
    """The global-token loss normalisation and the per-rank packing together: two FSDP ranks, each
    training its own packed bins, take the same step as one rank and as the plain-torch reference."""
    import ray
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = actor_config(toy_world.student_dir)
    vocab = AutoConfig.from_pretrained(toy_world.student_dir).vocab_size
    samples = synthetic_samples(7, 12, vocab=vocab, max_prompt=20, max_response=30)
    distillation = config.distillation.distillation_loss
    expected = reference_update(toy_world.student_dir, samples, distillation.loss_mode, distillation.topk)
    ray.init(num_cpus=4, num_gpus=3, include_dashboard=False)
    try:
        one, one_step = update_on_ranks(config, samples, 1, tmp_path / "one")
        two, two_step = update_on_ranks(config, samples, 2, tmp_path / "two")
    finally:
        ray.shutdown()

    assert [len(bins) for bins in two_step.rank_bins] == [len(two_step.rank_bins[0])] * 2
    assert len(two_step.rank_bins[0]) >= 2 and len(one_step.rank_bins[0]) >= 3  # micro-batches accumulate
    initial = load_file(f"{toy_world.student_dir}/model.safetensors")
    # The step moves the weights far more than the tolerance below.
    assert max((w - initial[name]).abs().max().item() for name, w in expected.weights.items()) > 0.1
    for name, reference in expected.weights.items():
        # A reference run: |difference| <= 1.1e-6 on either rank count.
        torch.testing.assert_close(one[name], reference, rtol=0, atol=2e-5, msg=name)
        torch.testing.assert_close(two[name], reference, rtol=0, atol=2e-5, msg=name)
    for step in (one_step, two_step):
        assert step.metrics["actor/loss"] == pytest.approx(expected.loss, rel=1e-5)
        assert step.metrics["actor/grad_norm"] == pytest.approx(expected.grad_norm, rel=1e-5)
        assert step.metrics["npd/drift_kl"] == pytest.approx(expected.drift, rel=1e-5)

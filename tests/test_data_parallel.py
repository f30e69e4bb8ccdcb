"""Data-parallel NPD: the batch the trainer sends reaches every rank as exactly the bins packed for it,
and one update on 2 FSDP ranks equals the update on 1 rank and a plain-torch reference; the same
holds for verl's own OPD update with the baseline's config, so the two compare at equal width."""

import contextlib
import random
from dataclasses import dataclass

import pytest
import torch

from verl_npd.rollout.async_manager import GeneratedSample, PromptItem
from verl_npd.trainer.near_policy_trainer import collate_samples, train_packed

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
        token_budget=64, temperature=1.0, seed=0,
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


# Each rank's npd_micro_batch assignment in two steps: equal micro-batch counts, then 2 against 3.
EQUAL_COUNTS = [[0, 1, 0, 1], [0, 0, 1, 1]]
UNEQUAL_COUNTS = [[0, 1, 0, 1], [1, 0, 2, 0]]


def _micro_batches_on_rank(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist
    from tensordict import TensorDict

    from verl_npd.trainer.packed_micro_batches import MICRO_BATCH_KEY, micro_batches_from_assignment

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for name, assignments in (("equal", EQUAL_COUNTS), ("unequal", UNEQUAL_COUNTS)):
            data = TensorDict({MICRO_BATCH_KEY: torch.tensor(assignments[rank])}, batch_size=[4])
            try:
                results[name, rank] = micro_batches_from_assignment(data, dist.group.WORLD)[1]
            except RuntimeError as e:
                results[name, rank] = str(e)
    finally:
        dist.destroy_process_group()


def test_ranks_given_unequal_micro_batch_counts_fail_instead_of_hanging(tmp_path):
    """FSDP's collectives pair up per micro-batch: the dispatch checks across the data-parallel
    group (gloo, 2 processes) that every rank runs as many, and names the counts when not (~30 s)."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_micro_batches_on_rank, args=(str(tmp_path / "init"), results), nprocs=2)
    assert results["equal", 0] == [[0, 2], [1, 3]] and results["equal", 1] == [[0, 1], [2, 3]]
    for rank in (0, 1):
        assert "given between 2 and 3 micro-batches" in results["unequal", rank], results["unequal", rank]


# ----------------------------------------------------------------------------------------------
# One update on 1 and on 2 FSDP ranks (verl's real actor workers, Ray, gloo)
# ----------------------------------------------------------------------------------------------
LR = 0.5
BUDGET = 96


@pytest.fixture(scope="module")
def ray_session():
    """One Ray session for the module's FSDP tests (3 logical GPUs: a 1-rank and a 2-rank group at a
    time); each test builds and removes its own worker groups."""
    import ray

    ray.init(num_cpus=4, num_gpus=3, include_dashboard=False)
    yield
    ray.shutdown()


def actor_config(config_dir: str, config_name: str, student_dir: str, overrides: tuple[str, ...] = ()):
    """A config's actor, with plain SGD (no clipping): the weights after one step are then
    w - lr * gradient, which a reference can compute directly. (Adam's first step is about
    lr * sign(gradient), blind to how the loss is scaled.)"""
    from conftest import compose

    return compose(
        config_dir,
        config_name,
        [
            f"actor_rollout_ref.model.path={student_dir}",
            "actor_rollout_ref.actor.optim.optimizer=SGD",
            f"actor_rollout_ref.actor.optim.lr={LR}",
            "actor_rollout_ref.actor.optim.clip_grad=1e9",
            "actor_rollout_ref.actor.optim.total_training_steps=1",
            "actor_rollout_ref.actor.checkpoint.save_contents=[hf_model]",
            *overrides,
        ],
    )


@contextlib.contextmanager
def actor_worker_group(config, ranks: int, name: str):
    """verl's actor worker group on ``ranks`` fresh FSDP ranks; its workers and placement group are
    removed afterwards, so that the next group gets the logical GPUs."""
    import ray
    from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
    from verl.workers.engine_workers import ActorRolloutRefWorker

    pool = RayResourcePool(process_on_nodes=[ranks], use_gpu=True, max_colocate_count=1, name_prefix=name)
    worker = RayClassWithInitArgs(
        cls=ray.remote(ActorRolloutRefWorker),
        config=config.actor_rollout_ref,
        distillation_config=config.distillation,
        role="actor",
    )
    group = RayWorkerGroup(resource_pool=pool, ray_cls_with_init=worker, device_name="cpu")
    try:
        group.init_model()
        yield group
    finally:
        for actor in group.workers:
            ray.kill(actor)
        for placement_group in pool.pgs or []:
            ray.util.remove_placement_group(placement_group)


def saved_weights(group, out_dir) -> dict[str, torch.Tensor]:
    """The student's weights, from verl's own HF checkpoint."""
    from safetensors.torch import load_file

    group.save_checkpoint(str(out_dir), None, 1)
    return load_file(str(out_dir / "huggingface" / "model.safetensors"))


def update_on_ranks(config, samples, ranks: int, out_dir) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One ``train_packed`` step on a fresh actor worker group of ``ranks`` FSDP ranks; returns the
    student's weights after it and the step's metrics."""
    with actor_worker_group(config, ranks, f"npd{ranks}") as group:
        packed = train_packed(
            group, samples, data_parallel_size=ranks, pad_id=0,
            token_budget=BUDGET, temperature=1.0, seed=0,
        )
        return saved_weights(group, out_dir), packed


def opd_update_on_ranks(config, samples, ranks: int, out_dir) -> tuple[dict[str, torch.Tensor], dict]:
    """One update as verl's own trainer makes it in the OPD baseline (``RayPPOTrainer.fit``,
    verl/trainer/ppo/ray_trainer.py:1549-1553 and 1690): the batch in the agent loop's layout,
    balanced over the data-parallel ranks (``_balance_batch``, on by default), then ``_update_actor`` (no-padding
    conversion, mini-batch settings, ``distillation_only``), whose workers micro-batch it with verl's
    dynamic batch size. verl's trainer methods run on a trainer that has only what they read:
    config, distillation config, actor worker group."""
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    from verl.utils.config import omega_conf_to_dataclass

    batch = collate_samples(samples, pad_id=0)
    with actor_worker_group(config, ranks, f"opd{ranks}") as group:
        trainer = RayPPOTrainer.__new__(RayPPOTrainer)
        trainer.config = config
        trainer.distillation_config = omega_conf_to_dataclass(config.distillation)
        trainer.actor_rollout_wg = group
        if config.trainer.balance_batch:
            trainer._balance_batch(batch, metrics={})
        batch.meta_info["global_token_num"] = torch.sum(batch.batch["attention_mask"], dim=-1).tolist()
        metrics = trainer._update_actor(batch).meta_info["metrics"]
        return saved_weights(group, out_dir), metrics


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
    from verl_npd.losses.verl_registration import LOSS_NAMES, env_settings

    model = AutoModelForCausalLM.from_pretrained(student_dir, torch_dtype=torch.float32, attn_implementation="sdpa")
    total, drift = torch.zeros(()), 0.0
    tokens = sum(len(s.response_ids) for s in samples)
    for s in samples:
        ids = torch.tensor(s.prompt.prompt_ids + s.response_ids)
        p, length = len(s.prompt.prompt_ids), len(ids)
        logits = model(input_ids=ids.unsqueeze(0)).logits[0]
        # Response token j (at p + j) is predicted at p + j - 1; teacher entry t scores token t + 1.
        scored = slice(p - 1, length - 1)
        per_token = per_token_distillation_loss(
            logits[scored], s.teacher_topk_ids[scored], s.teacher_topk_log_probs[scored], LOSS_NAMES[loss_name],
            env_settings(), target_ids=ids[p:], topk=topk,
        ).loss
        total = total + per_token.sum()
        student = torch.log_softmax(logits[scored].detach(), -1).gather(-1, ids[p:, None]).squeeze(-1)
        drift += (torch.tensor(s.rollout_log_probs) - student).sum().item()
    loss = total / tokens
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None))
    weights = {name: (p - LR * p.grad).detach() for name, p in model.named_parameters()}
    return ReferenceStep(weights=weights, loss=loss.item(), grad_norm=grad_norm.item(), drift=drift / tokens)


def samples_and_reference(config, student_dir: str, seed: int) -> tuple[list[GeneratedSample], ReferenceStep]:
    """12 synthetic samples and the reference step on them with the config's distillation loss."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(student_dir).vocab_size
    samples = synthetic_samples(seed, 12, vocab=vocab, max_prompt=20, max_response=30)
    distillation = config.distillation.distillation_loss
    return samples, reference_update(student_dir, samples, distillation.loss_mode, distillation.topk)


def assert_weights_equal_reference(student_dir: str, expected: ReferenceStep, *updated: dict[str, torch.Tensor]):
    from safetensors.torch import load_file

    initial = load_file(f"{student_dir}/model.safetensors")
    # The step moves the weights far more than the tolerance below.
    assert max((w - initial[name]).abs().max().item() for name, w in expected.weights.items()) > 0.1
    for name, reference in expected.weights.items():
        for weights in updated:
            torch.testing.assert_close(weights[name], reference, rtol=0, atol=2e-5, msg=name)


def test_one_update_is_the_same_on_one_and_two_ranks(toy_world, ray_session, tmp_path):
    """The global-token loss normalisation and the per-rank packing together: two FSDP ranks, each
    training its own packed bins, take the same step as one rank and as the plain-torch reference."""
    from conftest import TOY_CONFIG

    config = actor_config(*TOY_CONFIG, toy_world.student_dir)
    samples, expected = samples_and_reference(config, toy_world.student_dir, seed=7)
    one, one_step = update_on_ranks(config, samples, 1, tmp_path / "one")
    two, two_step = update_on_ranks(config, samples, 2, tmp_path / "two")

    assert [len(bins) for bins in two_step.rank_bins] == [len(two_step.rank_bins[0])] * 2
    assert len(two_step.rank_bins[0]) >= 2 and len(one_step.rank_bins[0]) >= 3  # micro-batches accumulate
    # A reference run: |difference| <= 1.1e-6 on either rank count.
    assert_weights_equal_reference(toy_world.student_dir, expected, one, two)
    for step in (one_step, two_step):
        assert step.metrics["actor/loss"] == pytest.approx(expected.loss, rel=1e-5)
        assert step.metrics["actor/grad_norm"] == pytest.approx(expected.grad_norm, rel=1e-5)
        assert step.metrics["npd/drift_kl"] == pytest.approx(expected.drift, rel=1e-5)


def test_verl_opd_update_is_the_same_on_one_and_two_ranks(toy_world, ray_session, tmp_path):
    """verl's OPD baseline at equal width: with the baseline config's actor and distillation loss, verl's
    own update (dynamic-batch-size micro-batches; ``token-mean``: verl's ``agg_loss`` divides each
    micro-batch's token sum by the response tokens of the global batch, all-reduced over the ranks,
    and multiplies it by dp_size against FSDP's gradient mean) takes the same step on 2 ranks as on 1
    and as the plain-torch reference."""
    from conftest import REPO

    config = actor_config(
        f"{REPO}/verl_npd/config/toy_opd", "opd_baseline", toy_world.student_dir,
        (
            "data.train_batch_size=12",  # ppo_mini_batch_size follows it: the batch is one optimiser step
            # A smaller token budget than the recipe's 512, so that micro-batches accumulate on each rank.
            f"actor_rollout_ref.actor.ppo_max_token_len_per_gpu={BUDGET}",
        ),
    )
    assert config.actor_rollout_ref.actor.loss_agg_mode == "token-mean"
    samples, expected = samples_and_reference(config, toy_world.student_dir, seed=8)
    one, one_metrics = opd_update_on_ranks(config, samples, 1, tmp_path / "one")
    two, two_metrics = opd_update_on_ranks(config, samples, 2, tmp_path / "two")

    # One student_mass entry per micro-batch, gathered over the ranks: verl's dynamic batch size split
    # the batch into several micro-batches on each rank, whose gradients accumulate.
    assert len(one_metrics["actor/distillation/student_mass"]) >= 3
    assert len(two_metrics["actor/distillation/student_mass"]) >= 4
    # A reference run: |difference| <= 2.4e-6 on either rank count.
    assert_weights_equal_reference(toy_world.student_dir, expected, one, two)
    for metrics in (one_metrics, two_metrics):
        (loss,), (grad_norm,) = metrics["actor/loss"], metrics["actor/grad_norm"]
        assert loss == pytest.approx(expected.loss, rel=1e-5)
        assert grad_norm == pytest.approx(expected.grad_norm, rel=1e-5)

"""The Δ-IFD sample filter (``delta_ifd.py``) and the IFD math it uses (``ifd.py``): plain torch.

Why not a verl extension: verl 0.9.1 has no per-sample filter extension point. Its only filtering
is DAPO group filtering (``algorithm.filter_groups``), hard-coded in the v1 ``ReplayBuffer`` and
keyed on reward variance within a prompt group; ``trainer.v1.sampler.custom_sampler`` replaces the
whole replay buffer class (loaded by file path), which sees TransferQueue tags, not the teacher and
student log-probs that Δ-IFD needs. The Δ-IFD filter needs IFD scores that only exist after the
teacher scoring pass and the unconditional prefills, so the NPD trainer's rollout manager calls it
at that point. Switching filtering off is ``npd.filter.enabled=false``: every sample is kept,
metrics still flow.
"""

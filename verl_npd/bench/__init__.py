"""``python -m verl_npd.bench``: NPD against verl's own on-policy distillation (synchronous and
asynchronous), SFT on teacher responses, and two NPD ablations, in one command, on the same
hardware, models, prompts, batch, lr, token budget, steps and validation.

Modules: ``settings`` (recipe and run size), ``methods`` (the methods and their command lines),
``sft_trainer`` (verl's SFT trainer, timed, in one CPU process), ``toy_data`` (validation subset,
teacher accuracy and SFT data of the toy world), ``readers`` (each method's outputs in one shape),
``report`` (targets, goals, results.json/.md, plots), ``runner`` (runs it all).

``python -m verl_npd.bench.packing`` is the other benchmark: NPD's packed micro-batches against
padded ones, for one training step (``packing``).
"""

"""verl's own on-policy distillation of the toy world, on CPU: the baselines NPD's demo is compared
with (``python -m verl.trainer.main_ppo --config-path pkg://verl_npd.config.toy_opd --config-name
opd_baseline``; recipes/toy_cpu/). A package so that Hydra finds them in an installed verl-npd too."""

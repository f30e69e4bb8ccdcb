#!/usr/bin/env bash
# bash recipes/toy_cpu/run_opd_baseline.sh [hydra overrides...]
#
# verl's built-in on-policy distillation of the toy student from the toy teacher on this machine's
# CPU, through verl's own entry point (the baseline NPD is compared against). Extra arguments are
# Hydra overrides, e.g. trainer.total_training_steps=5.
set -euo pipefail
# The config names the toy world's files; build it first if this machine has none yet (cached).
python -m verl_npd.toy > /dev/null
# The toy's OPD configs ship with the package (verl_npd/config/toy_opd/).
exec python -m verl.trainer.main_ppo --config-path pkg://verl_npd.config.toy_opd --config-name opd_baseline "$@"

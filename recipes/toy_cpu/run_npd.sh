#!/usr/bin/env bash
# bash recipes/toy_cpu/run_npd.sh [hydra overrides...]
#
# Near-Policy Distillation of the toy student from the toy teacher on this machine's CPU: main_npd's
# default config (verl_npd/config/npd_toy.yaml). Extra arguments are Hydra overrides.
set -euo pipefail
exec python -m verl_npd.main_npd "$@"

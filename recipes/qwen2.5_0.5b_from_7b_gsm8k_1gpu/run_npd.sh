# bash recipes/qwen2.5_0.5b_from_7b_gsm8k_1gpu/run_npd.sh
#
# Near-Policy Distillation of Qwen2.5-0.5B-Instruct from Qwen2.5-7B-Instruct on GSM8K on one GPU,
# the teacher served on the same GPU by run_teacher.sh (start that first). Everything is in
# config/npd.yaml; this script only checks the data and runs it from the repo root. Hydra overrides
# are passed through, e.g. --check (and --gpu-memory-gib N elsewhere than on the GPU machine) to
# print the resource plan and the memory estimate without starting anything.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."  # the verl-npd repo root

source recipes/require_data.sh
require_data "$HOME"/data/gsm8k/{train,test}.parquet -- "$@"

set -x
python -m verl_npd.main_npd --config-path "$PWD/recipes/qwen2.5_0.5b_from_7b_gsm8k_1gpu/config" --config-name npd "$@"

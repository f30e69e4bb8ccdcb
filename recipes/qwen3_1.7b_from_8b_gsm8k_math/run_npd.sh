# bash recipes/qwen3_1.7b_from_8b_gsm8k_math/run_npd.sh
#
# Near-Policy Distillation of Qwen3-1.7B from Qwen3-8B on GSM8K + MATH, one node with 8 GPUs
# (2 trainer GPUs, 4 GPUs of vLLM rollout replicas, 2 teacher GPUs). Everything is in
# config/npd.yaml; this script only checks the data and runs it from the repo root. Hydra
# overrides are passed through, e.g.
#   bash recipes/qwen3_1.7b_from_8b_gsm8k_math/run_npd.sh --check   # resource plan, memory, problems
#   bash recipes/qwen3_1.7b_from_8b_gsm8k_math/run_npd.sh npd.sync_interval=4 npd.buffer.max_staleness=4
#   bash recipes/qwen3_1.7b_from_8b_gsm8k_math/run_npd.sh trainer.logger='[console,wandb]'   # after wandb login
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."  # the verl-npd repo root

source recipes/require_data.sh
require_data "$HOME"/data/gsm8k/{train,test}.parquet "$HOME"/data/math/{train,test}.parquet -- "$@"

set -x
python -m verl_npd.main_npd --config-path "$PWD/recipes/qwen3_1.7b_from_8b_gsm8k_math/config" --config-name npd "$@"

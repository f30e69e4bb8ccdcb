# bash recipes/qwen2.5_0.5b_from_7b_gsm8k/run_npd.sh
#
# Near-Policy Distillation of Qwen2.5-0.5B-Instruct from Qwen2.5-7B-Instruct on GSM8K, one node with
# 4 GPUs (1 trainer GPU, 1 GPU for the vLLM rollout replica, 2 teacher GPUs). Everything is in
# config/npd.yaml; this script only checks the data and runs it from the repo root. Hydra overrides
# are passed through, e.g. (the 2-GPU variant is in README.md):
#   bash recipes/qwen2.5_0.5b_from_7b_gsm8k/run_npd.sh --check   # resource plan, memory, problems
#   bash recipes/qwen2.5_0.5b_from_7b_gsm8k/run_npd.sh trainer.logger='[console,wandb]'   # after wandb login
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."  # the verl-npd repo root

source recipes/require_data.sh
require_data "$HOME"/data/gsm8k/{train,test}.parquet -- "$@"

set -x
python -m verl_npd.main_npd --config-path "$PWD/recipes/qwen2.5_0.5b_from_7b_gsm8k/config" --config-name npd "$@"

# bash recipes/qwen2.5_0.5b_from_7b_gsm8k/run_opd_baseline.sh
#
# The baseline for run_npd.sh: verl's built-in synchronous on-policy distillation of
# Qwen2.5-0.5B-Instruct from Qwen2.5-7B-Instruct on GSM8K through verl's own trainer
# (verl.trainer.main_ppo), on the same 4 GPUs in verl's standard layout (2 trainer GPUs with the
# rollout colocated, 2 teacher GPUs), same models, data, batch, lengths, token budget, lr, top-k,
# loss and optimizer steps. Everything is in config/opd_baseline.yaml; this script only checks the
# data and runs it from the repo root. Hydra overrides are passed through, e.g. for verl's own top-k
# loss instead of NPD's:
#   bash recipes/qwen2.5_0.5b_from_7b_gsm8k/run_opd_baseline.sh \
#       distillation.distillation_loss.loss_mode=forward_kl_topk trainer.experiment_name=opd_baseline_verl_loss
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."  # the verl-npd repo root

source recipes/require_data.sh
require_data "$HOME"/data/gsm8k/{train,test}.parquet -- "$@"

set -x
python -m verl.trainer.main_ppo --config-path "$PWD/recipes/qwen2.5_0.5b_from_7b_gsm8k/config" --config-name opd_baseline "$@"

# bash recipes/qwen2.5_0.5b_from_7b_gsm8k_1gpu/run_teacher.sh
#
# Serves the teacher, Qwen2.5-7B-Instruct, with vLLM on the GPU that NPD then trains on: start it
# first, wait for "Application startup complete", then run run_npd.sh in another shell. vLLM takes
# its memory share when it starts and refuses to start with less free memory than that. The share,
# the port and the served name are config/npd.yaml's npd.teacher.gpu_memory_share, npd.teacher.url
# and npd.teacher.model; --max-model-len is data.max_prompt_length + data.max_response_length + 1
# (a scoring request prefills prompt + response and generates one token); --max-logprobs at least
# distillation.distillation_loss.topk; --max-num-batched-tokens bounds the full-vocabulary prompt
# logits of a scoring step. Extra arguments go to vllm serve.
set -euo pipefail

exec vllm serve Qwen/Qwen2.5-7B-Instruct --served-model-name teacher --host 127.0.0.1 --port 8000 \
    --gpu-memory-utilization 0.3 --max-model-len 1537 --max-num-batched-tokens 4096 --max-logprobs 64 "$@"

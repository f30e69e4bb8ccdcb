#!/usr/bin/env bash
# bash examples/ablations_toy_cpu.sh
#
# NPD on the toy world, then its two ablations, each writing its own summary.json.
set -euo pipefail
python -m verl_npd.main_npd npd.output_dir=outputs/ablations/npd
python -m verl_npd.main_npd npd.output_dir=outputs/ablations/no_filter npd.filter.enabled=false
python -m verl_npd.main_npd npd.output_dir=outputs/ablations/sync_every_step npd.sync_interval=1 npd.buffer.max_staleness=0

#!/usr/bin/env bash
# bash examples/score_and_filter_dataset.sh DATA.{parquet,jsonl} [TEACHER_DIR] [STUDENT_DIR]
#
# Offline Δ-IFD scoring: writes DATA.scored.<ext> with ifd_teacher, ifd_student, delta_ifd, keep and
# drop_reason per row, plus DATA.scored.<ext>.summary.json. Without model directories it uses the
# toy world's teacher and student (built on first use).
set -euo pipefail
data="$1"
teacher="${2:-$(python -c 'from verl_npd.toy import ensure_toy_world; print(ensure_toy_world().teacher_dir)')}"
student="${3:-$(python -c 'from verl_npd.toy import ensure_toy_world; print(ensure_toy_world().student_dir)')}"
out="${data%.*}.scored.${data##*.}"
python -m verl_npd.score --teacher "$teacher" --student "$student" --data "$data" --out "$out"

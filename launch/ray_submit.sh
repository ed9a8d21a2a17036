#!/usr/bin/env bash
# Submit the batch job to a running Ray cluster (the head's dashboard/job address).
#   RAY_ADDRESS=http://head-node:8265 launch/ray_submit.sh configs/llama3.1-8b-128k-apb.yaml in.jsonl out.jsonl
# Paths are relative to this repository, which Ray ships to the cluster as the job's working dir.
set -euo pipefail
# Input and output become absolute paths: the job runs in Ray's copy of this directory, where a
# relative output would be written and then lost. Job submission needs `pip install "ray[default]"`.
CONFIG=${1:?config}; INPUT=$(realpath "${2:?input jsonl}"); OUTPUT=$(realpath -m "${3:?output jsonl}")
cd "$(dirname "$0")/.."
exec ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --working-dir . -- \
  python launch/ray_job.py --config "$CONFIG" --input "$INPUT" --output "$OUTPUT"

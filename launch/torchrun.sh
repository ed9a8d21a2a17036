#!/usr/bin/env bash
# Single- or multi-node torchrun launch of the batch job.
#   one machine:  launch/torchrun.sh configs/tiny-cpu.yaml in.jsonl out.jsonl 2
#   each node of a cluster (same command everywhere, NODE_RANK differing):
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun.sh configs/llama3.1-8b-128k-apb.yaml in.jsonl out.jsonl 8
set -euo pipefail
CONFIG=${1:?config}; INPUT=${2:?input jsonl}; OUTPUT=${3:?output jsonl}; NPROC=${4:-2}
exec torchrun --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "$NPROC" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29511}" \
  "$(dirname "$0")/prefill.py" --config "$CONFIG" --input "$INPUT" --output "$OUTPUT"

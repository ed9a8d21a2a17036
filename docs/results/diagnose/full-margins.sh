#!/bin/sh
# Session 20: how sure full attention itself is of each niah answer (teacher-forced log-probability
# of the expected number against every other key's number, transformers' own forward in bfloat16),
# beside every approximate run's misses and gains of those cells. Run from the repository root.
set -ex
T=docs/results/eval-table
.venv/bin/python docs/results/diagnose/full_margins.py --length 4096 --full $T/niah-4096-w4.json.docs.jsonl \
  --json docs/results/diagnose/full-margins-niah-4096.json > docs/results/diagnose/full-margins-niah-4096.txt
.venv/bin/python docs/results/diagnose/full_margins.py --length 8000 --full $T/niah-8000-w4.json.docs.jsonl \
  --full $T/niah-8000-w4-rerun.json.docs.jsonl \
  --json docs/results/diagnose/full-margins-niah-8000.json > docs/results/diagnose/full-margins-niah-8000.txt
# passkey 8K, for contrast: one number per document, so only the leads
.venv/bin/python docs/results/diagnose/full_margins.py --task passkey --length 8000 --full $T/passkey-8000-w4.json.docs.jsonl \
  --json docs/results/diagnose/full-margins-passkey-8000.json > docs/results/diagnose/full-margins-passkey-8000.txt
# niah 2K (session 20's cell)
.venv/bin/python docs/results/diagnose/full_margins.py --length 2048 --full $T/niah-2048-w4.json.docs.jsonl \
  --json docs/results/diagnose/full-margins-niah-2048.json > docs/results/diagnose/full-margins-niah-2048.txt

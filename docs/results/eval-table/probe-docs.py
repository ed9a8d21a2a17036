"""Write some of `apb eval`'s generated documents as a --data file, to rerun just those.

    .venv/bin/python docs/results/eval-table/probe-docs.py TASK LENGTH INDICES OUT.jsonl
(INDICES comma-separated; the documents of `apb eval --tasks TASK --lengths LENGTH --samples 30`
on SmolLM2-135M-Instruct, chat style, seed 0.)
"""

import json
import sys

from transformers import AutoTokenizer

from apb.model.catalog import resolve_model
from apb.tools.evaluate import generate

task, length, indices, out = sys.argv[1], int(sys.argv[2]), [int(i) for i in sys.argv[3].split(",")], sys.argv[4]
tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
docs = generate([task], [length], max(indices) + 1, tokenizer, 0, "chat")
with open(out, "w", encoding="utf-8") as f:
    for i in indices:
        d = docs[i]
        f.write(json.dumps({k: d[k] for k in ("id", "context", "question", "answer")}) + "\n")
print(f"wrote {out}: {[docs[i]['id'] for i in indices]}")

"""Held-out accuracy: teacher forced during training, plain ``generate`` on a saved model."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from apb.model.text import encode_document
from apb.tools import tasks
from apb.tools.retrieval.data import collate, encode_example


def eval_docs(tokenizer, task: str, length: int, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"heldout:{task}:{length}:{seed}")
    return [tasks.make_example(task, length, tokenizer, rng, idx=i) for i in range(n)]


def answer_logits(model, ids, labels):
    """Logits at the positions that predict a labelled token, and those targets."""
    hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    sel = targets != -100
    return model.lm_head(hidden[sel]).float(), targets[sel], sel


@torch.no_grad()
def teacher_forced_accuracy(model, tokenizer, docs: list[dict], batch: int) -> float:
    """Fraction of docs whose every answer token (and eos) is the greedy argmax."""
    model.eval()
    correct = 0
    for i in range(0, len(docs), batch):
        ids, labels = collate([encode_example(tokenizer, d) for d in docs[i:i + batch]], tokenizer.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, targets, sel = answer_logits(model, ids, labels)
        ok = (logits.argmax(-1) == targets)
        # Regroup the flat selection per row.
        rows = sel.nonzero()[:, 0]
        for r in range(ids.shape[0]):
            correct += bool(ok[rows == r].all())
    model.train()
    return correct / len(docs)


@torch.no_grad()
def generate_eval(model_dir: Path, lengths: list[int], n: int, seed: int) -> dict:
    """Greedy ``generate`` accuracy per task and length with plain transformers (fp32, sdpa)."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    results = {}
    for length in lengths:
        for task in tasks.TASKS:
            docs = eval_docs(tok, task, length, n, seed + 1000)  # not the training-time held-out set
            hits, t0, n_tok = 0, time.time(), 0
            for d in docs:
                ctx, query = encode_document(tok, d["context"], d["question"])
                ids = torch.tensor([ctx + query])
                n_tok += ids.shape[1]
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                     do_sample=False, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
                new = out[0, ids.shape[1]:].tolist()
                if tok.eos_token_id in new:
                    new = new[:new.index(tok.eos_token_id)]
                # exact match, as the figures in docs/training.md were measured
                hits += tasks.score(tok.decode(new, skip_special_tokens=True), d["answer"], mode="exact")
            results[f"{task}@{length}"] = {"task": task, "length": length, "n": n, "accuracy": hits / n,
                                           "mean_prompt_tokens": n_tok / n, "seconds": round(time.time() - t0, 1)}
            print(json.dumps(results[f"{task}@{length}"]), flush=True)
    return results


def record_final_eval(model_dir: Path, lengths: list[int], n: int, seed: int) -> None:
    """:func:`generate_eval` a saved model and add the result under ``final_eval`` in its ``training_log.json``."""
    res = generate_eval(model_dir, lengths, n, seed)
    logf = model_dir / "training_log.json"
    log = json.loads(logf.read_text()) if logf.exists() else {}
    log.setdefault("final_eval", {}).update(res)
    logf.write_text(json.dumps(log, indent=1))

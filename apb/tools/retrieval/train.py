"""The training loop: curriculum, learning-rate schedule, held-out checks, checkpoints and resume.

:func:`train` runs the whole recipe (:mod:`apb.tools.retrieval` lists the steps): tokenizer,
model, then stage after stage of batches from :func:`apb.tools.tasks.make_training_sequence`,
a checkpoint every ``--ckpt-every`` steps (model, optimiser, data-stream state and curve, so
``--resume`` continues the same run), and the final model with its ``training_log.json``.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from apb.tools import tasks
from apb.tools.retrieval.data import collate, encode_training
from apb.tools.retrieval.evaluate import eval_docs, teacher_forced_accuracy
from apb.tools.retrieval.init import build_model
from apb.tools.retrieval.tokenizer import train_tokenizer


def parse_stages(spec: str) -> list[tuple[int, int, int]]:
    """``LEN:BATCH:MAX_STEPS,...`` as (length, batch, max steps) per stage."""
    out = []
    for part in spec.split(","):
        length, batch, steps = (int(x) for x in part.split(":"))
        out.append((length, batch, steps))
    return out


def save_model(model, tokenizer, out: Path, log: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps(log, indent=1))


def learning_rate(base: float, warmup: int, step: int, stage_step: int, max_steps: int, last: bool) -> float:
    """Linear warmup, constant, and in the last stage cosine decay to 10%."""
    lr = base * min(1.0, (step + 1) / warmup)
    if last:
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * stage_step / max_steps))
    return lr


def training_loss(model, ids, labels, pad_id: int, lm_weight: float):
    """(answer loss, loss to minimise): cross-entropy on the answers and their eos, plus ``lm_weight``
    times an auxiliary next-token loss on everything else (haystack, needles, questions)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
        targets, nexts = labels[:, 1:], ids[:, 1:]
        sel = targets != -100
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[sel]).float(), targets[sel])
        total = loss
        if lm_weight > 0:
            other = ~sel & (nexts != pad_id)
            lm = torch.nn.functional.cross_entropy(model.lm_head(hidden[other]).float(), nexts[other])
            total = loss + lm_weight * lm
    return loss, total


def save_checkpoint(ckpt_dir: Path, model, opt, rng: random.Random, counters: dict, curve: list) -> None:
    """Everything ``--resume`` needs; written to a temporary file and renamed, so a kill cannot tear it."""
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": rng.getstate(), **counters,
                "curve": curve}, ckpt_dir / "ckpt.pt.tmp")
    (ckpt_dir / "ckpt.pt.tmp").replace(ckpt_dir / "ckpt.pt")


def load_checkpoint(ckpt_dir: Path, model, opt, rng: random.Random) -> dict:
    """Restore model, optimiser and data stream; return the counters and the curve so far."""
    state = torch.load(ckpt_dir / "ckpt.pt", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    rng.setstate(state["rng"])
    return state


def train(args) -> None:
    torch.set_num_threads(args.threads)
    out, ckpt_dir = Path(args.out), Path(args.ckpt)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    stages = parse_stages(args.stages)
    tokenizer = train_tokenizer(args.vocab)
    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}  params {n_params / 1e6:.2f}M  stages {stages}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)
    rng = random.Random(args.seed)
    log = {"args": vars(args), "n_params": n_params, "vocab_size": len(tokenizer), "curve": []}
    stage, stage_step, step, elapsed = 0, 0, 0, 0.0
    if args.resume and (ckpt_dir / "ckpt.pt").exists():
        state = load_checkpoint(ckpt_dir, model, opt, rng)
        stage, stage_step, step, elapsed = state["stage"], state["stage_step"], state["step"], state["elapsed"]
        log["curve"] = state["curve"]
        stage = min(stage, len(stages) - 1)
        print(f"resumed at step {step}, stage {stage}, stage step {stage_step}", flush=True)
    model.train()
    t_start = time.time() - elapsed
    held_out = {}
    losses: list[float] = []
    while True:
        length, batch, max_steps = stages[stage]
        last = stage == len(stages) - 1
        if stage_step >= max_steps:
            if last:
                break
            stage, stage_step = stage + 1, 0
            continue
        lr = learning_rate(args.lr, args.warmup, step, stage_step, max_steps, last)
        for g in opt.param_groups:
            g["lr"] = lr
        pairs = [encode_training(tokenizer, *tasks.make_training_sequence(
                     length, tokenizer, rng, 1.0 if length <= args.dense_until else args.needle_fraction))
                 for _ in range(batch)]
        ids, labels = collate(pairs, tokenizer.pad_token_id)
        loss, total = training_loss(model, ids, labels, tokenizer.pad_token_id, args.lm_weight)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        stage_step += 1
        losses.append(loss.item())
        if step % args.log_every == 0:
            rec = {"step": step, "stage": stage, "length": length, "loss": sum(losses) / len(losses),
                   "lr": lr, "elapsed_s": round(time.time() - t_start, 1)}
            losses = []
            log["curve"].append(rec)
            print(json.dumps(rec), flush=True)
        if step % args.eval_every == 0 or stage_step == max_steps:
            if length not in held_out:
                held_out = {length: {t: eval_docs(tokenizer, t, length, args.eval_n, args.seed) for t in tasks.TASKS}}
            acc = {t: teacher_forced_accuracy(model, tokenizer, d, max(1, 8192 // length))
                   for t, d in held_out[length].items()}
            rec = {"step": step, "stage": stage, "length": length, "accuracy": acc, "n": args.eval_n,
                   "elapsed_s": round(time.time() - t_start, 1)}
            log["curve"].append(rec)
            print(json.dumps(rec), flush=True)
            if not last and min(acc["passkey"], acc["niah"]) >= args.advance_at and acc["vt"] >= args.advance_at_vt:
                stage, stage_step = stage + 1, 0
                print(f"advance to stage {stage}: {stages[stage]}", flush=True)
        if step % args.ckpt_every == 0:
            log["wall_s"] = round(time.time() - t_start, 1)
            save_checkpoint(ckpt_dir, model, opt, rng, {"stage": stage, "stage_step": stage_step, "step": step,
                                                        "elapsed": time.time() - t_start}, log["curve"])
            save_model(model, tokenizer, ckpt_dir / "model", log)
    log["wall_s"] = round(time.time() - t_start, 1)
    log["steps"] = step
    save_model(model, tokenizer, out, log)
    print(f"saved to {out} after {step} steps, {log['wall_s']} s", flush=True)

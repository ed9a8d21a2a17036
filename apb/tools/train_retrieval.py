"""Train a small Llama model (and its tokenizer) that retrieves from long contexts.

    python -m apb.tools.train_retrieval --out apb/data/retrieval-model [--stages ...] [--seed 0]

What it does, in order (all seeded; ``--threads`` CPU threads):

1. Trains a byte-level BPE tokenizer with the ``tokenizers`` library on the haystack text (the
   standard-library source of :mod:`apb.tools.tasks`) plus a drill of task sentences
   (:func:`tokenizer_drill`), so each key word, each variable name and each cue word is one
   token, and digits go in pairs (a 5-digit value is always 3 tokens). Specials ``<pad> <s>
   </s>``; saved as a ``PreTrainedTokenizerFast`` with bos/eos/pad set and no chat template.
2. Builds a ``LlamaConfig`` model (see ``--hidden`` etc.), starts the attention heads that
   retrieval needs (:func:`init_previous_token_heads`, :func:`init_feature_heads`), and trains it with AdamW on *dense*
   sequences from :func:`apb.tools.tasks.make_training_sequence`: a haystack holding many needles of
   all three tasks, then many ``\\n\\nQuestion: q\\nAnswer: a</s>`` pairs, with the loss only on
   the answer tokens and eos. The first pair follows the context exactly as
   :func:`apb.model.text.encode_document` builds a prompt.
3. Follows a short-to-long curriculum (``--stages LEN:BATCH:MAX_STEPS,...``). Every
   ``--eval-every`` steps it measures held-out accuracy per task at the stage length (teacher
   forced: an example counts as correct when the greedy argmax is right at every answer token
   and at eos, which is exactly when greedy decoding returns the answer) and moves to the next
   stage once passkey and niah reach ``--advance-at`` and vt ``--advance-at-vt``. The last stage runs to its step count, with
   the learning rate decaying to 10% over it.
4. Saves ``config.json``, ``model.safetensors``, the tokenizer files and ``training_log.json``
   (the learning curve) into ``--out``; a resumable checkpoint goes to ``--ckpt`` every
   ``--ckpt-every`` steps (``--resume`` picks it up).

``--eval-only DIR`` instead measures a saved model with plain ``generate`` (greedy, prompt from
:func:`apb.model.text.encode_document`) and records the result under ``final_eval`` in
``DIR/training_log.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from apb.tools import tasks
from apb.model.text import ANSWER_CUE, QUESTION_SEP, encode_document

SPECIALS = ["<pad>", "<s>", "</s>"]


# --------------------------------------------------------------------------- tokenizer
def tokenizer_drill(repeats: int, seed: int = 0) -> str:
    """Task sentences (every key word and variable name, values, question and answer cues).

    Mixed into the tokenizer's training text so that BPE keeps each key word, each variable
    name and each cue word a single token, and learns every 2-digit number with and without
    a leading space (the haystack alone has too few of them). The sentences restate the
    formats of :mod:`apb.tools.tasks` rather than calling its generators, whose random draws would
    change the shipped tokenizer's training text; tests/test_retrieval_model.py checks that
    the shipped tokenizer keeps every task word whole.
    """
    rng = random.Random(f"drill:{seed}")
    lines = []
    for _ in range(repeats):
        for k in tasks.KEY_WORDS:
            v = rng.randint(10000, 99999)
            lines.append(f"The value of key {k} is {v}.\n\nQuestion: What is the value of key {k}?\nAnswer: {v}\n")
        for n in tasks.VAR_NAMES:
            v, m = rng.randint(10000, 99999), rng.choice(tasks.VAR_NAMES)
            lines.append(f"VAR {n} = {v}.\nVAR {m} = VAR {n}.\n\nQuestion: Which variables are assigned the value {v}?"
                         f"\nAnswer: {n} {m}\n")
        v = rng.randint(10000, 99999)
        lines.append(f"The pass key is {v}.\n\nQuestion: {tasks.PASSKEY_QUESTION}\nAnswer: {v}\n")
    pairs = [f"{i:02d}" for i in range(100)]
    lines.append((" ".join(pairs) + " " + "".join(pairs) + "\n") * (repeats * 4))
    return "".join(lines)


def train_tokenizer(vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits go in pairs (a 5-digit value is always 3 tokens); everything else is GPT-2 style.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?[0-9]{1,2}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = tasks.haystack_text() + "\n" + tokenizer_drill(40)
    chunk = 1 << 16
    tok.train_from_iterator((text[i:i + chunk] for i in range(0, len(text), chunk)), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        model_max_length=8192)
    whole = [f" {w}" for w in tasks.KEY_WORDS + tasks.VAR_NAMES]
    split = [w for w in whole if len(tokenizer(w, add_special_tokens=False)["input_ids"]) != 1]
    if split:
        raise RuntimeError(f"tokenizer splits {len(split)} task words (e.g. {split[:5]}); raise --vocab")
    return tokenizer


# --------------------------------------------------------------------------- data
def encode_training(tokenizer, context: str, qa: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """(input ids, labels): labels are -100 except on each answer's tokens and its eos."""
    ids = [tokenizer.bos_token_id] + tokenizer(context, add_special_tokens=False)["input_ids"]
    labels = [-100] * len(ids)
    for q, a in qa:
        qids = tokenizer(QUESTION_SEP + q + ANSWER_CUE, add_special_tokens=False)["input_ids"]
        aids = tokenizer(" " + a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids += qids + aids
        labels += [-100] * len(qids) + aids
    return ids, labels


def encode_example(tokenizer, doc: dict) -> tuple[list[int], list[int]]:
    """An eval document as (prompt + answer + eos, labels on answer + eos)."""
    ctx, query = encode_document(tokenizer, doc["context"], doc["question"])
    aids = tokenizer(" " + doc["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ctx + query + aids, [-100] * (len(ctx) + len(query)) + aids


def collate(pairs, pad_id: int):
    """Right-pad to the longest; no attention mask is needed under causal attention (pads come last)."""
    n = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), n), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), n), -100, dtype=torch.long)
    for i, (x, y) in enumerate(pairs):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
    return ids, labels


def answer_logits(model, ids, labels):
    """Logits at the positions that predict a labelled token, and those targets."""
    hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    sel = targets != -100
    return model.lm_head(hidden[sel]).float(), targets[sel], sel


# --------------------------------------------------------------------------- eval
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


def eval_docs(tokenizer, task: str, length: int, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"heldout:{task}:{length}:{seed}")
    return [tasks.make_example(task, length, tokenizer, rng, idx=i) for i in range(n)]


@torch.no_grad()
def generate_eval(model_dir: Path, lengths: list[int], n: int, seed: int) -> dict:
    """Greedy ``generate`` accuracy per task and length with plain transformers (fp32, sdpa)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
                hits += tasks.score(tok.decode(new, skip_special_tokens=True), d["answer"])
            results[f"{task}@{length}"] = {"task": task, "length": length, "n": n, "accuracy": hits / n,
                                           "mean_prompt_tokens": n_tok / n, "seconds": round(time.time() - t0, 1)}
            print(json.dumps(results[f"{task}@{length}"]), flush=True)
    return results


def plot_curve(log_path: Path, png: Path) -> None:
    """Answer loss and held-out accuracy per task against step, stage lengths marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = json.loads(Path(log_path).read_text())["curve"]
    loss = [(r["step"], r["loss"]) for r in curve if "loss" in r]
    acc = [r for r in curve if "accuracy" in r]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax1.plot(*zip(*loss), lw=1)
    ax1.set_ylabel("answer loss (nats)")
    ax1.set_yscale("log")
    for task in tasks.TASKS:
        ax2.plot([r["step"] for r in acc], [r["accuracy"][task] for r in acc], marker="o", ms=3, label=task)
    ax2.set_ylabel("held-out accuracy (teacher forced)")
    ax2.set_xlabel("step")
    ax2.legend()
    starts = {}
    for r in curve:
        starts.setdefault(r["length"], r["step"])
    for length, step in starts.items():
        for ax in (ax1, ax2):
            ax.axvline(step, color="grey", lw=0.5, ls=":")
        ax2.text(step, 0.02, f" {length}", fontsize=7, color="grey")
    fig.suptitle("apb-retrieval training (stage lengths in tokens)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


# --------------------------------------------------------------------------- training
def _ints(spec: str) -> list[int]:
    return [int(x) for x in spec.split(",") if x.strip()]


def parse_stages(spec: str) -> list[tuple[int, int, int]]:
    out = []
    for part in spec.split(","):
        length, batch, steps = (int(x) for x in part.split(":"))
        out.append((length, batch, steps))
    return out


def build_model(args, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=8192, rope_theta=args.rope_theta, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa", attention_bias=args.prev_heads > 0)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    if args.prev_heads > 0:
        offsets = _ints(args.prev_offsets)
        init_previous_token_heads(model, [offsets[h % len(offsets)] for h in range(args.prev_heads)],
                                  args.prev_scale)
    if args.feature_heads:
        back = dict(tuple(int(x) for x in pair.split(":")) for pair in args.copy_back.split(",") if pair)
        init_feature_heads(model, args.prev_heads, _ints(args.induction_heads), args.seed, back,
                           _ints(args.same_token_heads))
    return model


def _orthonormal_rows(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    return q.T[:n].contiguous()


@torch.no_grad()
def init_feature_heads(model, n_offset_heads: int, induction_heads: list[int], seed: int,
                       copy_back: dict[int, int] | None = None, same_token_heads: list[int] = (),
                       s_o: float = 0.03, s_qk: float = 1.5, s_copy: float = 0.05) -> None:
    """Start the circuit retrieval needs, instead of waiting for training to stumble on it.

    - Layer 0, heads ``0..n_offset_heads-1`` (attention pattern from
      :func:`init_previous_token_heads`): each writes a sketch (a fixed 32-dim projection) of
      the token it looks at into its own residual subspace, so every position carries "which
      token sat d back".
    - Layer 1, every head: its value/output copy a sketch of the attended token towards the
      output (tied embeddings: writing a token's direction raises its logit). So attending to
      the right position lowers the loss at once, and q/k get a direct gradient. A head named in
      ``copy_back`` (head -> offset head) copies instead the token that offset head saw, i.e.
      the token d *before* the attended one: what ``vt`` needs, since a variable's name comes
      before the value or name it is matched on (``VAR ABC = 12345.``, ``VAR DEF = VAR ABC.``).
    - Layer 1, ``induction_heads``: on the slowly rotating half of the RoPE pairs (so the match
      does not depend on distance) the query is the current token's sketch and the key the
      sketch the offset-1 head wrote, which starts the head towards "the token after the
      previous occurrence of the current token" (the continuation of a value once its first
      token is out). Only towards: the query sketch shares the residual with the offset heads'
      writes, so at initialisation the match is noisy (docs/training.md has the figures).
      ``same_token_heads`` key on the token itself instead ("the previous occurrence of the
      current token"). With ``copy_back`` these give vt's hop: from ``ABC`` just written, find
      ``VAR DEF = VAR ABC.`` and copy ``DEF``.

    Without this a model this small sits on a long loss plateau (measured: 400 steps of 32
    x 160 tokens at chance). Nothing is frozen; training adjusts all of it.
    """
    cfg = model.config
    copy_back = copy_back or {}
    hd = cfg.hidden_size // cfg.num_attention_heads
    n_heads = cfg.num_attention_heads
    if cfg.num_key_value_heads != n_heads:
        raise ValueError("feature-head initialisation assumes num_key_value_heads == num_attention_heads")
    read = _orthonormal_rows(cfg.hidden_size, cfg.hidden_size, seed + 1)
    write = _orthonormal_rows(cfg.hidden_size, cfg.hidden_size, seed + 2)
    copy = _orthonormal_rows(cfg.hidden_size, cfg.hidden_size, seed + 3)
    l0, l1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    for h in range(n_offset_heads):
        rows = slice(h * hd, (h + 1) * hd)
        l0.v_proj.weight[rows] = read[:hd]  # one sketch for every offset, written to per-offset subspaces
        l0.o_proj.weight[:, rows] = s_o * write[rows].T
    for h in range(n_heads):
        rows = slice(h * hd, (h + 1) * hd)
        back = copy_back.get(h)
        if back is None:
            l1.v_proj.weight[rows] = copy[rows]
            l1.o_proj.weight[:, rows] = s_copy * copy[rows].T
        else:  # read offset head `back`'s subspace: the token that sat offsets[back] before the attended one
            bw = slice(back * hd, (back + 1) * hd)
            l1.v_proj.weight[rows] = write[bw]
            l1.o_proj.weight[:, rows] = s_copy * read[:hd].T
    half = hd // 2
    slow = [j for j in range(half // 2, half)] + [j + half for j in range(half // 2, half)]
    for h in [*induction_heads, *same_token_heads]:
        l1.q_proj.weight[h * hd:(h + 1) * hd] = 0.0
        l1.k_proj.weight[h * hd:(h + 1) * hd] = 0.0
        for i, j in enumerate(slow):
            l1.q_proj.weight[h * hd + j] = s_qk * read[i]
            # induction: offset head 0's subspace (the previous token); same-token: the token itself
            l1.k_proj.weight[h * hd + j] = s_qk * (write[i] if h in induction_heads else read[i])


@torch.no_grad()
def init_previous_token_heads(model, offsets: list[int], scale: float) -> None:
    """Start heads ``0..len(offsets)-1`` of layer 0 as fixed-offset heads (head i looks ``offsets[i]`` back).

    Retrieval needs an induction-style circuit: a layer-0 head that copies the previous token
    into each position, which a later head matches against. From a random start the model sits
    on a long loss plateau before it finds that head; here its attention pattern is set at
    initialisation through the q/k *biases* (constant vectors, so the score depends only on the
    distance): on the four fastest RoPE frequencies, ``q = a`` and ``k = a * e^{i d theta}``,
    so ``q . k`` at distance ``m - n`` is ``a^2 sum cos((m - n - d) theta)``, highest at
    ``m - n = d``. The q/k weights of these heads start at zero; everything stays trainable.
    """
    cfg = model.config
    hd = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // cfg.num_attention_heads
    attn = model.model.layers[0].self_attn
    theta = cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    attn.q_proj.bias.zero_()
    attn.k_proj.bias.zero_()
    attn.v_proj.bias.zero_()
    attn.o_proj.bias.zero_()
    kv_per_q = cfg.num_attention_heads // cfg.num_key_value_heads
    for h, d in enumerate(offsets):
        qs, ks = slice(h * hd, (h + 1) * hd), slice((h // kv_per_q) * hd, (h // kv_per_q + 1) * hd)
        attn.q_proj.weight[qs] = 0.0
        attn.k_proj.weight[ks] = 0.0
        q = torch.zeros(hd, dtype=torch.float64)
        k = torch.zeros(hd, dtype=torch.float64)
        for j in range(4):  # pair (j, j + hd/2) is one complex number under HF's rotate_half RoPE
            q[j] = scale
            k[j] = scale * math.cos(d * inv_freq[j])
            k[j + hd // 2] = scale * math.sin(d * inv_freq[j])
        attn.q_proj.bias[qs] = q.float()
        attn.k_proj.bias[ks] = k.float()


def save_model(model, tokenizer, out: Path, log: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps(log, indent=1))


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
        state = torch.load(ckpt_dir / "ckpt.pt", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        rng.setstate(state["rng"])
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
        # Learning rate: linear warmup, constant, and in the last stage cosine decay to 10%.
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        if last:
            lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * stage_step / max_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        pairs = [encode_training(tokenizer, *tasks.make_training_sequence(
                     length, tokenizer, rng, 1.0 if length <= args.dense_until else args.needle_fraction))
                 for _ in range(batch)]
        ids, labels = collate(pairs, tokenizer.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
            targets, nexts = labels[:, 1:], ids[:, 1:]
            sel = targets != -100
            loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[sel]).float(), targets[sel])
            total = loss
            if args.lm_weight > 0:  # auxiliary next-token loss on everything else (haystack, needles, questions)
                other = ~sel & (nexts != tokenizer.pad_token_id)
                lm = torch.nn.functional.cross_entropy(model.lm_head(hidden[other]).float(), nexts[other])
                total = loss + args.lm_weight * lm
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
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": rng.getstate(),
                        "stage": stage, "stage_step": stage_step, "step": step, "elapsed": time.time() - t_start,
                        "curve": log["curve"]}, ckpt_dir / "ckpt.pt.tmp")
            (ckpt_dir / "ckpt.pt.tmp").replace(ckpt_dir / "ckpt.pt")
            save_model(model, tokenizer, ckpt_dir / "model", log)
    log["wall_s"] = round(time.time() - t_start, 1)
    log["steps"] = step
    save_model(model, tokenizer, out, log)
    print(f"saved to {out} after {step} steps, {log['wall_s']} s", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="apb/data/retrieval-model")
    p.add_argument("--ckpt", default="/tmp/apb-retrieval-ckpt")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=3072)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--rope-theta", type=float, default=1e8)
    p.add_argument("--prev-heads", type=int, default=6, help="layer-0 heads initialised as previous-token heads")
    p.add_argument("--induction-heads", default="0,1,2,3,7", help="layer-1 heads initialised as induction heads")
    p.add_argument("--same-token-heads", default="6", help="layer-1 heads initialised to match the current token")
    p.add_argument("--copy-back", default="6:2,7:3",
                   help="layer-1 head:offset-head pairs that copy the token that offset head saw (see init_feature_heads)")
    p.add_argument("--feature-heads", type=int, default=1,
                   help="1: token-copying value/output paths for the offset heads and layer 1 (see init_feature_heads)")
    p.add_argument("--prev-offsets", default="1,2,3,4,5,6", help="how far back each of those heads looks")
    p.add_argument("--prev-scale", type=float, default=5.0, help="q/k bias magnitude of those heads")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lm-weight", type=float, default=0.0,
                   help="weight of an auxiliary next-token loss on the non-answer tokens (0: answers only)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--stages", default="160:32:500,512:16:250,1024:8:150,2048:4:120,4096:2:120",
                   help="LEN:BATCH:MAX_STEPS,... (short to long; the last runs to its step count)")
    p.add_argument("--advance-at", type=float, default=0.9, help="passkey and niah accuracy to move on")
    p.add_argument("--advance-at-vt", type=float, default=0.5, help="vt accuracy to move on")
    p.add_argument("--needle-fraction", type=float, default=0.6)
    p.add_argument("--dense-until", type=int, default=160, help="stages up to this length are needles only (no haystack)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-n", type=int, default=32)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--eval-only", default=None, help="measure a saved model directory instead of training")
    p.add_argument("--eval-lengths", default="4096")
    p.add_argument("--eval-final-n", type=int, default=100)
    p.add_argument("--plot-curve", nargs=2, metavar=("TRAINING_LOG", "PNG"), help="plot a saved learning curve")
    args = p.parse_args(argv)
    if args.plot_curve:
        plot_curve(Path(args.plot_curve[0]), Path(args.plot_curve[1]))
        return
    if args.eval_only:
        torch.set_num_threads(args.threads)
        d = Path(args.eval_only)
        res = generate_eval(d, [int(x) for x in args.eval_lengths.split(",")], args.eval_final_n, args.seed)
        logf = d / "training_log.json"
        log = json.loads(logf.read_text()) if logf.exists() else {}
        log.setdefault("final_eval", {}).update(res)
        logf.write_text(json.dumps(log, indent=1))
        return
    train(args)


if __name__ == "__main__":
    main()

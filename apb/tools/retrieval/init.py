"""The model and the retrieval circuit it starts with: a ``LlamaForCausalLM`` whose offset, copy
and induction-style heads are set at initialisation instead of found by training."""

from __future__ import annotations

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def _ints(spec: str) -> list[int]:
    return [int(x) for x in spec.split(",") if x.strip()]


def build_model(args, tokenizer) -> LlamaForCausalLM:
    """The model the command's flags (``args``) describe, its circuit heads initialised and the rest random."""
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

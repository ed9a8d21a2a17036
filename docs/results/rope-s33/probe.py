"""Which families apb can score with the query at its true positions, and whether the shift is right.

    python docs/results/rope-s33/probe.py MODELS_DIR [MODELS_DIR ...] > docs/results/rope-s33/probe-<commit>.txt

For every checkpoint that families-s32/make.py made (float32, apb's attention): whether apb's
config check (``rope.shiftable``) and its model check (``rope.rope_shift``) accept the model, and,
where they do, an independent check of the shift. The model runs the same 3 tokens at positions
7-9 and 1007-1009 with its real attention (apb's kernel, no context: plain causal attention over
the 3 tokens). Attention over RoPE-rotated queries and keys depends only on relative positions,
so every layer's input is the same at both offsets and each layer's query at 1007 must equal
its query at 7 turned by 1000 with the shift apb would use; the same again for the last 1,003
positions the model takes (``max_position_embeddings``), where a query scaled by its position
would show (``max_rel``: the largest error over layers and both pairs, relative to the query's
largest entry). A rotary pinned to the prompt's length (dynamic
NTK, longrope) runs inside ``prompt_length`` with a 30,000-token prompt, past every original
length here, as a prefill of that prompt would. Run it from a directory without apb/ in it, with
PYTHONPATH at an installed wheel of the commit under test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AttentionInterface

from apb.model.hf_bridge import ATTN_IMPLEMENTATION, apb_attention_forward, prompt_length
from apb.model.loading import load_model
from apb.model.rope import rope_shift, shiftable

DELTA, PROMPT = 1000, 30_000
seen: dict[int, torch.Tensor] = {}


def spy(module, q, k, v, attention_mask=None, **kw):
    seen[int(module.layer_idx)] = q.detach().float().clone()
    return apb_attention_forward(module, q, k, v, attention_mask, **kw)


def queries(model, ids, start):
    seen.clear()
    with torch.no_grad():
        model(input_ids=ids, position_ids=torch.arange(start, start + ids.shape[1])[None], use_cache=False)
    return dict(seen)


def check(path: Path) -> str:
    model = load_model(str(path), "float32")
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if not shiftable(cfg):
        return "refused (config)"
    with prompt_length(model, PROMPT):
        shift = rope_shift(model)
        if shift is None:
            return "refused (model)"
        ids = torch.randint(3, text.vocab_size, (1, 3), generator=torch.Generator().manual_seed(0))
        last = int(getattr(text, "max_position_embeddings", 0) or 0)
        starts = [7] + ([last - 3 - DELTA] if last - 3 - DELTA > 7 + DELTA else [])
        worst, still = 0.0, 0
        for start in starts:
            AttentionInterface.register(ATTN_IMPLEMENTATION, spy)
            try:
                here, there = queries(model, ids, start), queries(model, ids, start + DELTA)
            finally:
                AttentionInterface.register(ATTN_IMPLEMENTATION, apb_attention_forward)
            # a query scaled by its position (Ministral 3) is rescaled too, where apb knows the scale
            ratio = shift.ratio(torch.arange(start, start + 3), DELTA) if hasattr(shift, "ratio") else None
            for layer, q in here.items():
                turned = (shift.shift(q, DELTA, layer, ratio=ratio) if ratio is not None
                          else shift.shift(q, DELTA, layer)).float()
                rel = float((turned - there[layer]).abs().max()) / (float(there[layer].abs().max()) or 1.0)
                worst = max(worst, rel)
        still = sum(not shift.turns[layer] for layer in here)
    kinds = sorted(set(getattr(shift, "kinds", {}).values()))
    return (f"moves    max_rel {worst:.1e}  layers {len(here)}  without RoPE {still}"
            + (f"  angles per type: {','.join(kinds)}" if kinds else ""))


def main() -> None:
    torch.set_num_threads(1)
    for root in sys.argv[1:]:
        for path in sorted(Path(root).iterdir()):
            if not (path / "config.json").exists():
                continue
            try:
                verdict = check(path)
            except Exception as e:  # noqa: BLE001 - a row per family, whatever stops it
                verdict = f"stopped  {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
            print(f"{path.name:28s} {verdict}", flush=True)


if __name__ == "__main__":
    main()

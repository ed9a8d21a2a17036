"""The training script's pieces, without training: supervision layout and the circuit initialisation."""

import argparse
import json
import random
import subprocess
import sys

import torch

from apb.tools import tasks
from apb.model.text import byte_tokenizer
from apb.tools.retrieval.data import encode_training
from apb.tools.retrieval.init import build_model


def test_training_sequence_supervises_exactly_each_answer_and_its_eos():
    tok = byte_tokenizer()
    rng = random.Random(3)
    context, qa = tasks.make_training_sequence(600, tok, rng, needle_fraction=0.8)
    answers = [a for _, a in qa]
    assert len(qa) >= 3 and len(set(answers)) == len(answers)  # values are never reused within a sequence
    ids, labels = encode_training(tok, context, qa)
    assert len(ids) == len(labels)
    # the supervised tokens, in order, are " answer</s>" for every pair
    supervised = [t for t in labels if t != -100]
    expected = []
    for _, a in qa:
        expected += tok(" " + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert supervised == expected
    # and every answer sits right after its question's cue
    text = tok.decode(ids)
    for q, a in qa:
        assert f"Question: {q}\nAnswer: {a}" in text
    # every needle of every question is in the context
    for q, a in qa:
        if q.startswith("What is the value of key"):
            key = q.rsplit(" ", 1)[1].rstrip("?")
            assert f"The value of key {key} is {a}." in context


def _model(layers=2):
    args = argparse.Namespace(hidden=256, intermediate=512, layers=layers, heads=8, kv_heads=8, rope_theta=1e8,
                              seed=0, prev_heads=6, prev_offsets="1,2,3,4,5,6", prev_scale=5.0, feature_heads=1,
                              induction_heads="0,1,2,3,7", same_token_heads="6", copy_back="6:2,7:3")
    model = build_model(args, byte_tokenizer())
    model.config._attn_implementation = "eager"  # attention weights to inspect
    return model.eval()


def test_offset_heads_look_their_distance_back():
    model = _model()
    ids = torch.randint(3, 259, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        att = model(input_ids=ids, output_attentions=True).attentions[0][0]  # layer 0: heads x t x t
    t = torch.arange(10, 200)
    for h, d in enumerate(range(1, 7)):
        hit = (att[h, t].argmax(-1) == t - d).float().mean().item()
        assert hit > 0.95, (h, d, hit)


def test_layer1_match_heads_look_at_the_earlier_occurrence():
    """Same-token head 6 finds the earlier occurrence of the current token; induction head 0 is
    only nudged towards the token after it (see docs/training.md: its query sketch shares the
    residual with the offset heads' writes, so at initialisation the match is noisy)."""
    model = _model()
    g = torch.Generator().manual_seed(1)
    first = torch.randperm(256, generator=g)[:60] + 3  # distinct tokens, so "the earlier occurrence" is unique
    ids = torch.cat([torch.tensor([1]), first, first]).unsqueeze(0)
    with torch.no_grad():
        att = model(input_ids=ids, output_attentions=True).attentions[1][0]  # layer 1
    second = torch.arange(62, 121)  # positions in the repeat (but its first token)
    earlier = second - 60
    top2 = att[6, second].topk(2, dim=-1).indices
    assert (top2 == earlier[:, None]).any(-1).float().mean().item() > 0.8  # (the other of the two is itself)
    hit = (att[0, second].argmax(-1) == earlier + 1).float().mean().item()
    chance = (1 / (second + 1).float()).mean().item()
    assert hit > 4 * chance, (hit, chance)


def test_a_run_resumes_from_its_checkpoint(tmp_path):
    """Two steps, then --resume to four: the resumed run loads the checkpoint (weights_only) and
    continues at step 3 instead of starting over."""
    common = [sys.executable, "-m", "apb.tools.retrieval", "--out", str(tmp_path / "out"), "--ckpt",
              str(tmp_path / "ckpt"), "--ckpt-every", "1", "--eval-every", "100", "--eval-n", "2", "--log-every", "1"]
    first = subprocess.run(common + ["--stages", "64:2:2"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    second = subprocess.run(common + ["--stages", "64:2:4", "--resume"], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "resumed at step 2" in second.stdout
    log = json.loads((tmp_path / "out" / "training_log.json").read_text())
    assert [r["step"] for r in log["curve"] if "loss" in r] == [1, 2, 3, 4] and log["steps"] == 4

"""apb diagnose: the pure comparisons (spans, drift, attention mass, recall) and whole diagnoses on
tiny-llama at W=2, where the answers are known: exact variants drift by nothing and keep all the
mass, apb's host 0 is exact and host 1 is not, and passing every block recalls every needle token."""

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from apb.cli import main
from apb.config import load_config
from apb.model.catalog import resolve_model
from apb.model.loading import load_model
from apb.model.text import byte_tokenizer, encode_document, load_tokenizer
from apb.parallel import layout
from apb.parallel.groups.local import LocalWorkerGroup
from apb.runtime.cache import KVCache
from apb.tools import diagnose as dg
from apb.tools.evaluate import generate
from apb.tools.verify import random_prompt, reference_run

CONTEXT = ("Filler text about nothing. The pass key is 12345. Remember it. 12345 is the pass key.\n"
           "More filler, with 123456 and x12345 that are other words.")


def _bpe_tokenizer():
    """A byte-level BPE trained on the context, so tokens span several characters."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CONTEXT] * 4, trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>"],
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


def test_first_divergence():
    assert dg.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert dg.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert dg.first_divergence([1, 2], [1, 2, 3]) == 2


@pytest.mark.parametrize("make", [byte_tokenizer, _bpe_tokenizer])
def test_find_spans_on_a_hand_made_prompt(make):
    tok = make()
    ctx, query = encode_document(tok, CONTEXT, "What is the pass key, 12345?")
    ids = ctx + query
    answers = dg.find_spans(tok, ids, len(ctx), ["12345"])
    # whole words only, and never in the query
    assert [tok.decode(ids[a:b]).strip() for a, b in answers] == ["12345", "12345"]
    needles = dg.find_spans(tok, ids, len(ctx), ["12345"], sentence=True)
    assert [tok.decode(ids[a:b]).strip() for a, b in needles] == ["The pass key is 12345.", "12345 is the pass key."]
    assert all(b <= len(ctx) for _, b in needles)
    assert dg.find_spans(tok, ids, len(ctx), ["54321"]) == []


def test_host_positions_partition_the_prompt():
    n_ctx, n_query = 90, 10
    for slices in (layout.anchored(n_ctx, n_query, 3, 20, 4, (0,)), layout.spava(n_ctx, n_query, 3, 9)):
        groups = dg.host_positions(slices, n_ctx)
        assert list(groups) == ["h0", "h1", "h2", "q"]
        assert torch.equal(torch.cat(list(groups.values())).sort().values, torch.arange(n_ctx + n_query))


def test_relative_drift_is_per_layer_and_per_group():
    ref = torch.randn(2, 3, 10, 4)
    other = ref.clone()
    other[1, :, 5:] += 0.1 * torch.randn(3, 5, 4)
    first, second = torch.arange(5), torch.arange(5, 10)
    assert dg.relative_drift(ref, other, first).tolist() == [0.0, 0.0]
    drift = dg.relative_drift(ref, other, second)
    expect = (other[1, :, 5:] - ref[1, :, 5:]).norm() / ref[1, :, 5:].norm()
    assert drift[0] == 0 and drift[1] == pytest.approx(float(expect), rel=1e-5)
    assert torch.isnan(dg.relative_drift(ref, other, torch.zeros(0, dtype=torch.long))).all()


def test_needle_recall_counts_chosen_needle_tokens_per_kv_head():
    slices = layout.anchored(40, 4, 2, 5, 2, ())  # blocks [0, 20) and [20, 40)
    needle = torch.tensor([24, 25, 26, 27])
    passing = [{0: torch.tensor([[0, 1], [2, 3]])},
               {0: torch.tensor([[24, 25, 30], [20, 21, 22]]), 1: torch.tensor([[24, 25, 26], [27, 28, 29]])}]
    assert dg.needle_recall(passing, slices, needle, 3) == [0.25, 0.5, None]  # (2+0)/2/4, (3+1)/2/4, none passed
    assert dg.needle_recall([None, None], slices, needle, 1) == [None]  # a method without passing (star)
    # an exact layer (method.exact_layers) passes nothing, and every later block sees the needle
    assert dg.needle_recall(passing, slices, needle, 3, frozenset({1})) == [0.25, 1.0, None]
    assert dg.needle_recall(passing, slices, torch.tensor([50]), 2, frozenset({1})) == [None, None]  # in no block
    assert dg.needle_hosts(slices, needle) == {"h1": 4}


def test_attention_mass_matches_a_naive_softmax():
    model = load_model(resolve_model("tiny-llama"), "float32", "cpu", attn_implementation="eager")
    n, n_query = 48, 6
    n_ctx = n - n_query
    ids = random_prompt(n, model.config.vocab_size, seed=3)
    ref = reference_run(model, ids, 1)
    cache = KVCache(torch.arange(n), tuple(zip(ref.keys, ref.values)))
    probs, logits = dg.query_attention(model, cache, n_ctx, ids[n_ctx:])
    torch.testing.assert_close(logits[-1], ref.logits, atol=1e-4, rtol=1e-4)  # the replay is the model's own forward
    with torch.no_grad():  # every row, not only the last: the rows after the query replay answer tokens
        whole = model(input_ids=ids[None]).logits[0, n_ctx:].float()
    torch.testing.assert_close(logits, whole, atol=1e-4, rtol=1e-4)
    assert probs.shape == (2, 12, n_query, n)

    # layer 0 by hand: the query's Q after RoPE against every key, GQA repeated, causal over the query
    m, attn = model.model, model.model.layers[0].self_attn
    x = m.layers[0].input_layernorm(m.embed_tokens(ids[None, n_ctx:]))
    q = attn.q_proj(x).view(1, n_query, 12, 16).transpose(1, 2)
    cos, sin = m.rotary_emb(x, torch.arange(n_ctx, n)[None])
    q = apply_rotary_pos_emb(q, q, cos, sin)[0][0]
    keys = ref.keys[0].repeat_interleave(3, dim=0)  # 4 KV heads serve 12 query heads
    scores = q @ keys.transpose(-1, -2) / 16 ** 0.5
    visible = torch.arange(n)[None] <= n_ctx + torch.arange(n_query)[:, None]
    naive = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1).detach()
    torch.testing.assert_close(probs[0], naive, atol=1e-5, rtol=1e-4)

    span = torch.arange(10, 17)
    mass = dg.attention_mass(probs, span)
    assert mass.shape == (2, n_query)
    for row in (0, n_query - 1):
        assert mass[0, row].item() == pytest.approx(naive[:, row, span].sum(-1).mean().item(), abs=1e-5)
    assert dg.attention_mass(probs, torch.arange(n)).flatten().tolist() == pytest.approx([1.0] * 2 * n_query, abs=1e-5)


def test_decoys_are_the_wrong_values_the_context_holds():
    context = "The number for mirror is 64317. The number for thunder is 25506. A VAR is XKQ. Call 911 on page 42."
    answers = ["The number for mirror is 25506.", "It is 25506, or 11111, or XKQ; not 64317. Maybe 91, or 42."]
    # 25506 and XKQ occur as words; 11111 does not; 64317 is expected; 91 is only inside 911; 42 is too short to tell
    assert dg.decoy_strings(answers, ["64317"], context) == ["25506", "XKQ"]
    assert dg.decoy_strings(["The number is 64317."], ["64317"], context) == []


def test_top_tokens_are_the_most_likely_with_their_probabilities():
    tok = byte_tokenizer()
    logits = torch.full((len(tok),), -30.0)
    (a,), (b,) = tok("a", add_special_tokens=False)["input_ids"], tok("b", add_special_tokens=False)["input_ids"]
    logits[a], logits[b] = 2.0, 1.0
    top = dg.top_tokens(tok, logits, k=2)
    assert [t for t, _ in top] == [tok.decode([a]), tok.decode([b])]
    e = torch.tensor([2.0, 1.0]).exp()
    assert [p for _, p in top] == pytest.approx((e / e.sum()).tolist(), abs=1e-4)


# -- whole diagnoses on worker processes --------------------------------------------------------
@pytest.fixture(scope="module")
def group2():
    with LocalWorkerGroup(2, worker_kwargs={"device": "cpu", "timeout_s": 120}, timeout_s=300) as g:
        yield g


@pytest.fixture(scope="module")
def doc():
    tokenizer = load_tokenizer(resolve_model("tiny-llama"))
    return generate(["passkey"], [500], 1, tokenizer, seed=0, style="code")[0]


def _diagnose(group, doc, method, *overrides):
    cfg = load_config(None, ["parallel.device=cpu", "decode.max_new_tokens=4", *overrides])
    return dg.diagnose(cfg, method, doc, group, progress=lambda _: None)


def _values(report, key, group):
    return [row[key][group] for row in report["layers"]]


def test_exact_variant_drifts_by_nothing_and_keeps_all_the_mass(group2, doc):
    report = _diagnose(group2, doc, "apb:uncompressed")
    assert report["needle"]["text"] == [f"The pass key is {doc['answer']}."]
    assert report["first_divergence"] is None
    for key in ("k_drift", "v_drift"):
        for g in ("h0", "h1", "q", "needle"):
            assert max(_values(report, key, g)) < 1e-5, (key, g)
    assert all(row["mass"]["needle"]["kept_last"] == pytest.approx(1.0, abs=1e-4) for row in report["layers"])
    assert _values(report, "recall", "needle") == [1.0, 1.0]  # every block is passed whole
    assert max(report["replay_max_abs_logit_diff"].values()) < 1e-4
    json.dumps(report)  # the report is JSON as it is


def test_apb_drifts_on_host_1_only_and_records_what_it_passed(group2, doc):
    report = _diagnose(group2, doc, "apb", "method.passing_len=16")
    assert max(_values(report, "k_drift", "h0")) < 1e-5  # host 0's block sees only itself: exact
    k1 = _values(report, "k_drift", "h1")
    assert k1[0] < 1e-5 < k1[1]  # layer 0's K/V come from the embeddings alone
    recall = _values(report, "recall", "needle")
    assert all(r is not None and 0.0 <= r <= 1.0 for r in recall)
    # the replay reproduces the method's own exact query phase over its (approximate) caches
    assert report["replay_max_abs_logit_diff"][report["method"]] < 1e-4


@pytest.mark.parametrize("method", ["apb", "spava"])
def test_passing_every_block_recalls_the_whole_needle(group2, doc, method):
    report = _diagnose(group2, doc, method, "method.passing_len=all")
    assert report["needle"]["hosts"]  # the needle sits in a block, not in spava's anchor
    assert _values(report, "recall", "needle") == [1.0, 1.0]
    drift = max(_values(report, "k_drift", "h1"))
    if method == "apb":  # the anchor, a copy with the query inside, still changes host 1's block
        assert drift > 1e-5
    else:  # spava's anchor is the true prefix: passing every block whole is exact
        assert drift < 1e-5


def test_star_passes_nothing(group2, doc):
    report = _diagnose(group2, doc, "star", "method.anchor_len=8")
    assert _values(report, "recall", "needle") == [None, None]


def test_cli_refuses_an_unknown_document(tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"id": "a", "context": "x", "question": "y", "answer": "z"}) + "\n")
    assert main(["diagnose", "--data", str(data), "--id", "b"]) == 2
    assert "--id 'b' is not in" in capsys.readouterr().err
    assert main(["diagnose", "--data", str(data)]) == 2

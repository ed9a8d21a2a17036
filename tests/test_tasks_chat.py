"""Chat-style task documents (prose haystack), RULER-style scoring, and what `apb eval` reports per document."""

import argparse
import json
import random
import re
import subprocess

import pytest

from apb.model.text import byte_tokenizer, encode_document
from apb.tools import evaluate, tasks
from apb.tools.haystack import _NEEDLE_LIKE, haystack_for, prose_units, story_paragraphs

# SmolLM2-135M-Instruct's chat template: a default system turn, then the user turn, then the
# assistant header; the byte tokenizer under it counts one token per byte.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_tok():
    tok = byte_tokenizer()
    tok.chat_template = SMOLLM2_TEMPLATE
    return tok


def _prompt_tokens(tok, doc) -> int:
    ctx, query = encode_document(tok, doc["context"], doc["question"])
    return len(ctx) + len(query)


def test_prose_haystack_is_plain_english_in_a_fixed_order():
    units, starts = prose_units()
    text = "".join(units)
    assert len(text) > 100_000 and starts[0] == 0 and list(starts) == sorted(starts)
    assert "::=" not in text and ">>>" not in text and "****" not in text
    assert not re.search(r"(?<![\w*])\*{1,2}[A-Za-z_][^*\n]{0,40}?\*{1,2}(?![\w*])", text)  # no *emphasis*
    assert not re.search(r"\d{5}|pass key|magic number", text)  # nothing that passes for a needle
    assert all(u.endswith((". ", ".\n\n")) for u in units)
    assert prose_units() == (units, starts)


def test_story_haystack_is_plain_varied_english_in_a_fixed_order():
    units, starts = prose_units("story")
    text = "".join(units)
    assert len(text) > 100_000 and starts[0] == 0 and list(starts) == sorted(starts)
    assert not _NEEDLE_LIKE.search(text.replace("'s ", " ")) and not re.search(r"number|pass key", text)
    assert all(u.endswith((". ", ".\n\n")) and u[0].isupper() for u in units)
    assert prose_units("story") == (units, starts) and story_paragraphs() == story_paragraphs.__wrapped__()
    # varied enough that a document is not one sentence repeated: most sentences are distinct
    assert len(set(units)) > 0.5 * len(units)


@pytest.mark.parametrize("style,source", [("chat", "story"), ("chat-docs", "prose"), ("code", "code")])
def test_each_style_draws_from_its_haystack_and_the_clis_offer_every_style(chat_tok, style, source):
    from apb.cli import diagnose, eval as eval_cli

    assert tasks.STYLES[style][0] == source
    doc = tasks.make_example("passkey", 1500, chat_tok, random.Random(5), style=style)
    hay = haystack_for(chat_tok, source)
    body = doc["context"].split("\n\n", 1)[-1] if style != "code" else doc["context"]
    assert sum(u.strip() in body for u in hay.units[:2000]) >= 5  # built from that source's sentences
    for module in (eval_cli, diagnose):
        parser = module.add_parser(argparse.ArgumentParser().add_subparsers())
        choices = next(a.choices for a in parser._actions if a.dest == "style")
        assert set(choices) == {"auto", *tasks.STYLES}


@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("length", [1024, 4096])
def test_chat_documents_have_the_requested_prompt_length(chat_tok, task, length):
    rng = random.Random(f"len:{task}:{length}")
    for i in range(3):
        doc = tasks.make_example(task, length, chat_tok, rng, idx=i, style="chat")
        assert abs(_prompt_tokens(chat_tok, doc) - length) <= 0.03 * length, doc["id"]


def test_chat_documents_have_the_requested_length_without_a_chat_template(repo):
    from apb.model.text import load_tokenizer

    tok = load_tokenizer(repo / "apb" / "data" / "retrieval-model")
    assert tasks.default_style(tok) == "code"
    for task in tasks.TASKS:
        doc = tasks.make_example(task, 2048, tok, random.Random(task), style="chat")
        assert abs(_prompt_tokens(tok, doc) - 2048) <= 0.03 * 2048, doc["id"]


def test_chat_phrasing_needles_and_answers(chat_tok):
    assert tasks.default_style(chat_tok) == "chat"
    doc = tasks.make_example("passkey", 2048, chat_tok, random.Random(1), style="chat")
    v = doc["answer"]
    assert re.fullmatch(r"\d{5}", v)
    assert f"The pass key is {v}. Remember it. {v} is the pass key." in doc["context"]
    assert doc["question"] == "What is the pass key? Answer with the number only."
    assert doc["context"].startswith(tasks.CHAT.preambles["passkey"] + "\n\n")

    doc = tasks.make_example("niah", 2048, chat_tok, random.Random(2), style="chat")
    key = re.match(r"What is the special magic number for (\w+) mentioned in the provided text\? "
                   r"Answer with the number only\.$", doc["question"]).group(1)
    assert f"One of the special magic numbers for {key} is: {doc['answer']}." in doc["context"]
    assert len(re.findall(r"One of the special magic numbers for \w+ is: \d{5}\.", doc["context"])) >= 4

    doc = tasks.make_example("vt", 2048, chat_tok, random.Random(3), style="chat")
    value = re.match(r"Find all variables that are assigned the value (\d{5})\. Answer with the variable names "
                     r"only, separated by spaces\.$", doc["question"]).group(1)
    names = doc["answer"].split()
    assert len(names) == 4 and f"VAR {names[0]} = {value}." in doc["context"]
    for prev, cur in zip(names, names[1:]):
        assert f"VAR {cur} = VAR {prev}." in doc["context"]


def test_code_style_is_the_default_and_unknown_styles_are_rejected():
    tok = byte_tokenizer()
    a = tasks.make_example("passkey", 600, tok, random.Random(0))
    b = tasks.make_example("passkey", 600, tok, random.Random(0), style="code")
    assert a == b and a["question"] == tasks.PASSKEY_QUESTION
    assert f"The pass key is {a['answer']}." in a["context"].splitlines()
    with pytest.raises(ValueError, match="styles: code, chat"):
        tasks.make_example("passkey", 600, tok, random.Random(0), style="prose")


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.35, 0.5, 0.8, 1.0])
def test_needle_sits_at_its_depth_in_tokens(chat_tok, depth):
    hay = haystack_for(chat_tok, "prose")
    needle = "The pass key is 12345. Remember it. 12345 is the pass key."
    n = 8000
    context = hay.fit([(depth, needle)], n, hay.n_tokens, start=hay.starts[7])
    before = hay.n_tokens(context[:context.index(needle)])
    total = hay.n_tokens(context) - hay.n_tokens(needle + " ")
    assert abs(total - n) <= 0.03 * n
    assert abs(before - depth * total) <= 0.03 * total  # the nearest sentence boundary


def test_contains_scoring_ignores_case_and_surrounding_whitespace():
    assert tasks.score("86638", "86638")
    assert tasks.score("  The pass key is 86638.\n", "86638")
    assert tasks.score("Apple", " apple ")
    assert not tasks.score("823", "86638")
    assert not tasks.score("8663", "86638")
    assert not tasks.score("", "86638")
    assert tasks.score("", "") and not tasks.score("anything", "")


def test_exact_scoring_is_equality_after_strip():
    assert tasks.score(" 86638\n", "86638", mode="exact")
    assert not tasks.score("The pass key is 86638.", "86638", mode="exact")
    assert not tasks.score("apple", "Apple", mode="exact")
    assert tasks.score("ABC DEF", ["ABC", "DEF"], mode="exact")
    with pytest.raises(ValueError, match="modes: contains, exact"):
        tasks.score("1", "1", mode="fuzzy")


def test_vt_needs_every_name_in_any_order():
    want = tasks.expected("vt", "ABC DEF GHI JKL")
    assert want == ["ABC", "DEF", "GHI", "JKL"]
    assert tasks.expected("passkey", "86638") == "86638"
    assert tasks.score("ABC DEF GHI JKL", want)
    assert tasks.score("The variables are: abc, def, ghi and jkl.", want)
    assert tasks.score("JKL GHI DEF ABC", want)
    assert not tasks.score("ABC DEF GHI", want)
    assert not tasks.score("ABC DEF GHI JK", want)


def test_standard_error():
    assert evaluate.standard_error(0.9, 30) == pytest.approx((0.9 * 0.1 / 30) ** 0.5)
    assert evaluate.standard_error(0.5, 2) == pytest.approx(0.3535534, rel=1e-6)
    assert evaluate.standard_error(1.0, 12) == 0.0 and evaluate.standard_error(0.0, 0) == 0.0


def _rec(task, answers):
    return {"task": task, "length": 512, "id": "x", "expected": "1",
            "answers": {m: {"answer": a, "correct": a == "1", "prefill_s": 0.1, "error": None if a else "boom"}
                        for m, a in answers.items()}}


def test_summarise_counts_accuracy_errors_and_agreement_with_full():
    records = [_rec("passkey", {"full": "1", "apb": "1"}), _rec("passkey", {"full": "2", "apb": "2"}),
               _rec("passkey", {"full": "1", "apb": "3"}), _rec("passkey", {"full": "2", "apb": None})]
    rows = {r["method"]: r for r in evaluate.summarise(records, ["full", "apb"], world_size=2)}
    assert rows["full"] | {"stderr": 0} == {"task": "passkey", "method": "full", "length": 512, "world_size": 2,
                                           "accuracy": 0.5, "n": 4, "stderr": 0, "agreement_with_full": 1.0,
                                           "errors": 0, "misses_vs_full": [], "gains_vs_full": []}
    assert rows["apb"]["accuracy"] == 0.25 and rows["apb"]["errors"] == 1
    assert rows["apb"]["agreement_with_full"] == 0.5  # same answer on 2 of 4; a failure agrees with nothing
    assert rows["apb"]["stderr"] == pytest.approx((0.25 * 0.75 / 4) ** 0.5)
    table = evaluate.format_table(list(rows.values()))
    assert "0.250 ± 0.217 (0.50) [1 failed]" in table and "0.500 ± 0.250" in table
    # full right on documents 0 and 2; apb right on 0 only: it misses one (every id here is "x"), gains none
    assert rows["apb"]["misses_vs_full"] == ["x"] and rows["apb"]["gains_vs_full"] == []
    no_full = evaluate.summarise(records, ["apb"], world_size=2)
    assert no_full[0]["agreement_with_full"] is None and "misses_vs_full" not in no_full[0]


def _doc(i, answers, question="q?", expected="1"):
    return {"task": "passkey", "length": 512, "id": f"passkey-512-{i}", "question": question, "expected": expected,
            "answers": {m: {"answer": a, "correct": a == expected, "prefill_s": 0.1, "error": None}
                        for m, a in answers.items()}}


def test_compare_saved_runs_counts_misses_gains_and_agreement_by_document_id():
    reference = [_doc(i, {"full": a}) for i, a in enumerate(["1", "1", "2", "1"])]
    # a separate run over the same documents, in another order and missing one: matched by id
    sweep = [_doc(3, {"apb": "1"}), _doc(0, {"apb": "3"}), _doc(2, {"apb": "1"})]
    rows = evaluate.compare({"sweep": sweep, "same": reference}, reference)
    by = {(r["run"], r["method"]): r for r in rows}
    apb = by[("sweep", "apb")]
    assert (apb["n"], apb["accuracy"], apb["reference_accuracy"]) == (3, 2 / 3, 2 / 3)
    assert apb["misses"] == ["passkey-512-0"] and apb["gains"] == ["passkey-512-2"]
    assert apb["agreement"] == pytest.approx(1 / 3)  # only document 3's answer is full's
    same = by[("same", "full")]
    assert same["agreement"] == 1.0 and same["misses"] == same["gains"] == []
    table = evaluate.format_comparison(rows)
    assert "1 (0) / 1 (2)" in table and "-" in table and "id@x" not in table  # files without leads
    # with the reference's leads recorded, each miss and gain shows full's own lead there
    for rec, lead in zip(reference, [0.06, 1.5, 0.25, 2.0]):
        rec["answers"]["full"]["lead"] = lead
    rows = evaluate.compare({"sweep": sweep}, reference)
    assert (rows[0]["miss_leads"], rows[0]["gain_leads"]) == ([0.06], [0.25])
    table = evaluate.format_comparison(rows)
    assert "1 (0@0.06) / 1 (2@0.25)" in table and "id@x: full's lead" in table


def test_compare_refuses_runs_over_other_documents():
    reference = [_doc(0, {"full": "1"})]
    with pytest.raises(ValueError, match="passkey-512-0 differs"):
        evaluate.compare({"r": [_doc(0, {"apb": "1"}, question="another?")]}, reference)
    with pytest.raises(ValueError, match="passkey-512-7 is not in the reference"):
        evaluate.compare({"r": [_doc(7, {"apb": "1"})]}, reference)
    with pytest.raises(ValueError, match="no answer by 'full'.*--reference-method"):
        evaluate.compare({"r": reference}, [_doc(0, {"star": "1"})])


def test_apb_compare_reads_eval_files_and_reports_bad_ones(tmp_path, capsys):
    from apb.cli import main

    ref, run = tmp_path / "full.json.docs.jsonl", tmp_path / "sweep.json.docs.jsonl"
    ref.write_text("".join(json.dumps(_doc(i, {"full": "1"})) + "\n" for i in range(3)))
    run.write_text("".join(json.dumps(_doc(i, {"spava": a})) + "\n" for i, a in enumerate(["1", "5", "1"])))
    assert main(["compare", str(run), "--reference", str(ref), "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "sweep" in out and "2/3" in out and "1 (1) / 0 (-)" in out
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert rows[0]["misses"] == ["passkey-512-1"]
    (tmp_path / "bad.jsonl").write_text('{"id": "a"}\n')
    assert main(["compare", str(tmp_path / "bad.jsonl"), "--reference", str(ref)]) == 2
    assert "not a record of `apb eval --json`" in capsys.readouterr().err


def test_a_worker_failure_counts_wrong_and_the_eval_goes_on(monkeypatch, tmp_path):
    """A failure on one document restarts the shared group; the other documents are still answered."""
    from apb.config import load_config
    from apb.parallel.groups import WorkerError

    started, closed = [], []

    class Group:
        def __init__(self):
            started.append(self)

        def close(self, force=False):
            closed.append((self, force))

    class FakeEngine:
        calls = 0

        def __init__(self, cfg, group):
            self.method, self.group = cfg.method.name, group

        def process_one(self, doc):
            FakeEngine.calls += 1
            if self.method == "apb" and doc["id"] == "d1" and len(started) == 1:
                raise WorkerError("rank 1 died")
            return {"answer": "42", "prefill_s": 0.5, "error": None}

    monkeypatch.setattr(evaluate, "start_group", lambda cfg: Group())
    monkeypatch.setattr(evaluate, "Engine", FakeEngine)
    docs = [{"id": f"d{i}", "context": "c", "question": "q", "answer": "42", "task": "t", "length": 8}
            for i in range(3)]
    out = tmp_path / "docs.jsonl"
    rows = evaluate.evaluate(load_config(None), ["full", "apb"], docs, docs_path=out, progress=lambda *_: None)
    assert FakeEngine.calls == 6 and len(started) == 2
    assert closed[0] == (started[0], True) and closed[-1][0] is started[1]
    apb = next(r for r in rows if r["method"] == "apb")
    assert apb["accuracy"] == pytest.approx(2 / 3) and apb["errors"] == 1
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert recs[1]["answers"]["apb"]["error"].startswith("worker failure: rank 1 died")
    assert recs[1]["answers"]["apb"]["correct"] is False and recs[2]["answers"]["apb"]["correct"] is True


def test_eval_writes_every_answer_per_document_and_agreement(apb_bin, repo, tmp_path):
    out = tmp_path / "eval.json"
    proc = subprocess.run([apb_bin, "eval", "--config", str(repo / "configs/tiny-cpu.yaml"), "--model", "tiny-llama",
                           "--methods", "full,apb", "--world-size", "2", "--tasks", "passkey,vt", "--lengths", "256",
                           "--samples", "1", "--style", "chat", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "documents: chat style" in proc.stdout and "±" in proc.stdout
    report = json.loads(out.read_text())
    assert report["style"] == "chat" and report["scoring"] == "contains"
    recs = [json.loads(line) for line in open(report["documents"])]
    assert report["documents"] == f"{out}.docs.jsonl"
    assert [(r["task"], r["length"], r["id"]) for r in recs] == [("passkey", 256, "passkey-256-0"),
                                                                  ("vt", 256, "vt-256-0")]
    for r in recs:
        assert set(r["answers"]) == {"full", "apb"} and r["expected"]
        for a in r["answers"].values():
            assert a["error"] is None and isinstance(a["answer"], str) and a["prefill_s"] > 0
            assert a["correct"] == tasks.score(a["answer"], tasks.expected(r["task"], r["expected"]))
    for row in report["results"]:
        rec = next(r for r in recs if r["task"] == row["task"])
        got, full = rec["answers"][row["method"]], rec["answers"]["full"]
        assert row["n"] == 1 and row["errors"] == 0 and row["accuracy"] == float(got["correct"])
        assert row["stderr"] == 0.0  # one document: p is 0 or 1
        assert row["agreement_with_full"] == float(got["answer"] == full["answer"])

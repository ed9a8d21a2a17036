"""The packaged retrieval model (apb/data/retrieval-model): format, loading path, and that it retrieves.

Accuracy here is a floor on a few fixed documents, checked through plain transformers
``generate`` (the independent reference) and through our runtime at W=2; the measured figures
live in docs/results.md and docs/training.md.
"""

import json
import random
import subprocess

import pytest
import torch

from apb.tools import tasks
from apb.model.loading import packaged_path

MODEL = packaged_path("apb-retrieval")


def test_checkpoint_is_hugging_face_format_safetensors_and_small():
    names = {p.name for p in MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".py")) for n in names)  # nothing unsafe, no remote code
    total = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file())
    assert total <= 20 * 2**20
    cfg = json.loads((MODEL / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]


def _load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(MODEL), local_files_only=True, dtype=torch.float32).eval()
    return tok, model


def test_tokenizer_keeps_task_words_whole():
    tok, _ = _load()
    for w in tasks.KEY_WORDS + tasks.VAR_NAMES:
        assert len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1, w
    assert tok.decode(tok(" 48213", add_special_tokens=False)["input_ids"]) == " 48213"


def _docs(tok, task, length, n, seed=7):
    rng = random.Random(f"test:{task}:{length}:{seed}")
    return [tasks.make_example(task, length, tok, rng, idx=i) for i in range(n)]


@pytest.mark.parametrize("task,floor", [("passkey", 5), ("niah", 5), ("vt", 4)])
def test_plain_transformers_generate_retrieves(task, floor):
    from apb.model.text import encode_document

    tok, model = _load()
    hits = 0
    for doc in _docs(tok, task, 1024, 5):
        ctx, query = encode_document(tok, doc["context"], doc["question"])
        ids = torch.tensor([ctx + query])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        hits += tasks.score(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), doc["answer"])
    assert hits >= floor


def test_runtime_answers_match_expected_with_full_and_apb(repo, tmp_path):
    from apb.config import load_config
    from apb.engine import Engine, start_group

    cfg_path = str(repo / "configs" / "tiny-cpu.yaml")
    overrides = ["model.name_or_path=apb-retrieval", "parallel.world_size=2"]
    cfg = load_config(cfg_path, overrides)
    group = start_group(cfg)
    try:
        engines = {m: Engine(load_config(cfg_path, overrides + [f"method.name={m}"]), group=group)
                   for m in ("full", "apb")}
        tok = engines["full"].tokenizer
        docs = _docs(tok, "passkey", 1024, 2) + _docs(tok, "niah", 1024, 2)
        for m, e in engines.items():
            answers = [r["answer"] for r in e.process(docs)]
            assert sum(tasks.score(a, d["answer"]) for a, d in zip(answers, docs)) >= 3, (m, answers)
    finally:
        group.close()


def test_demo_answers_are_right(apb_bin, repo):
    proc = subprocess.run([apb_bin, "demo", "--config", str(repo / "configs/tiny-cpu.yaml"), "--model", "apb-retrieval"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "model apb-retrieval" in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if x.startswith("right answers:"))
    right, total = (int(x) for x in line.split("full ")[1].split("/"))
    assert total == 9 and right >= 6, proc.stdout  # bundled: 3 each of passkey, niah, vt at ~2K tokens

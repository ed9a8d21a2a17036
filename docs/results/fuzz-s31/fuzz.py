# Session 31: session 30's random `apb verify` runs (docs/results/fuzz-s30/fuzz.py), taken where
# that one did not go: 9-16 hosts, prompts up to 10,000 tokens, and the retaining_heads compressor
# with a weights file made for each model (`random_retaining_heads`, as the tests make theirs).
# Run (from a folder without an apb/ in it, a wheel of the commit under test on PYTHONPATH):
#   cd /tmp/run && PYTHONPATH=SITE /work/main/.venv/bin/python /work/main/docs/results/fuzz-s31/fuzz.py SEED MINUTES \
#     > /work/main/docs/results/fuzz-s31/fuzz-SEED.txt
# Each run's JSON rows and log tail go to docs/results/fuzz-s31/runs/SEED-K.{json,log}; summarise with
# docs/results/fuzz-s30/summary.py pointed at this folder.
import json
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "fuzz-s30"))
from fuzz import METHODS, MODELS  # noqa: E402  the same presets and methods as session 30


def heads_file(model: str) -> Path:
    """A random retaining-heads file for ``model``'s shape (made once, kept under runs/heads/)."""
    from transformers import AutoConfig

    from apb.methods.compressors import random_retaining_heads
    from apb.model.catalog import resolve_model

    out = HERE / "runs" / "heads" / f"{model}.safetensors"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        random_retaining_heads(out, AutoConfig.from_pretrained(resolve_model(model)), hidden=32)
    return out


def pick(rng: random.Random) -> dict:
    w = rng.randint(9, 16)
    n = rng.choice([rng.randint(w, 600), rng.randint(600, 10000), w * rng.randint(1, 10000 // w),
                    w * rng.randint(1, 10000 // w) + 1, w - 1 + w * rng.randint(1, 80)])
    q = min(rng.choice([1, rng.randint(1, 40), rng.randint(1, 40), 0]), n - 1)
    model = rng.choice(MODELS)
    sets = []
    if rng.random() < 0.3:
        sets.append(f"method.anchor_len={rng.choice([0, 1, 7, 64, 0.5])}")
    if rng.random() < 0.3:
        sets.append(f"method.passing_len={rng.choice([1, 5, 33, 0.25, 'all'])}")
    if rng.random() < 0.2:
        sets.append(f"method.round_to={rng.choice([2, 16, 128])}")
    if rng.random() < 0.2:
        sets.append(f"method.exact_layers={rng.choice([1, 2])}")
    r = rng.random()
    if r < 0.35:
        sets += ["method.compressor=retaining_heads", f"method.retaining_heads_path={heads_file(model)}"]
    elif r < 0.5:
        sets.append(f"method.compressor={rng.choice(['snapkv', 'stride'])}")
    if rng.random() < 0.25:
        sets.append("method.query_positions=anchor")
    return {"model": model, "w": w, "n": n, "q": q, "decode": rng.choice(["gather", "distributed"]),
            "dtype": rng.choice(["float32"] * 4 + ["bfloat16"]), "sets": sets}


def main(seed: int, minutes: float) -> None:
    rng = random.Random(seed)
    runs = HERE / "runs"
    runs.mkdir(exist_ok=True)
    end = time.time() + minutes * 60
    k = 0
    while time.time() < end:
        c = pick(rng)
        stem = runs / f"{seed}-{k}"
        cmd = [sys.executable, "-m", "apb", "verify", "--model", c["model"], "--methods", METHODS, "--world-size", str(c["w"]),
               "--prompt-len", str(c["n"]), "--query-len", str(c["q"]), "--decode", c["decode"], "--dtype", c["dtype"],
               "--tokens", "3", "--json", f"{stem}.json", "--set", "parallel.timeout_s=120"]
        for s in c["sets"]:
            cmd += ["--set", s]
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
            rc, out = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, out = "timeout", str(e.stdout or "") + str(e.stderr or "")
        stem.with_suffix(".log").write_text(" ".join(cmd) + "\n" + out[-6000:])
        rows = json.loads(Path(f"{stem}.json").read_text()) if Path(f"{stem}.json").exists() else None
        if isinstance(rows, dict):
            rows = rows.get("rows", rows.get("results"))
        bad, errors = [], set()
        for r in rows or []:
            why = r.get("error") or r.get("reason") or ""
            if r.get("exact_expected") and not r.get("passed"):
                bad.append(f"{r.get('method')}: {why[:200]}")
            elif r.get("error"):
                errors.add(f"{r.get('method')}: {why[:120]}")
        print(f"{k:3d} rc={rc} {time.time() - t0:5.1f}s {c['model']} W={c['w']} n={c['n']} q={c['q']} {c['decode']} "
              f"{c['dtype']} {' '.join(c['sets'])} | exact not passed: {bad if bad else 'none'}"
              + ("" if rows is not None else " | NO JSON") + (f" | refused: {sorted(errors)}" if errors else ""),
              flush=True)
        k += 1


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]))

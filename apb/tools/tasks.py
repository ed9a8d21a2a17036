"""Seeded long-context retrieval tasks over a haystack of Python standard-library source.

Each generator is pure: it takes a tokenizer, a target prompt length in *tokens* of that
tokenizer, and a ``random.Random``, and returns a document ``{"id", "context", "question",
"answer"}`` that :func:`apb.model.text.encode_document` turns into a prompt. The haystack is real
text present on every machine: a fixed, sorted list of the standard library's own source files
(a file missing on this Python version is skipped), cut at line boundaries. Needles are
inserted as lines of their own.

Tasks, and what each tests:

``passkey``
    One needle, ``The pass key is NNNNN.``, at a random depth. Question ``What is the pass
    key?``; answer the 5-digit number. Tests single-needle retrieval at any depth: under a split
    context exactly one host holds the needle.
``niah``
    4-8 key-value needles ``The value of key <word> is NNNNN.`` at random depths; one key is
    asked: ``What is the value of key <word>?``. Tests retrieval by content among distractor
    needles of the same form (the host must match the key, not just spot a needle).
``vt``
    Variable tracking (after RULER): a chain ``VAR ABC = NNNNN.``, ``VAR DEF = VAR ABC.``,
    ``VAR GHI = VAR DEF.``, ``VAR JKL = VAR GHI.`` whose links are spread over successive
    quarters of the context (so under a split context the hops sit on different hosts), plus a
    distractor chain of the same shape holding another value. Question ``Which variables are
    assigned the value NNNNN?``; answer the chain's names in order, space separated
    (``ABC DEF GHI JKL``). Each name is found from the previous one, so the answer needs one
    lookup per hop, across the whole context. Names are 3 capitals drawn from the fixed list
    :data:`VAR_NAMES`.

:func:`score` is exact match after ``strip()``. :func:`write_dataset` writes JSONL.
:func:`make_training_sequence` is the dense training mixture (many needles of all three kinds,
then many question/answer pairs) used by :mod:`apb.tools.train_retrieval`.
"""

from __future__ import annotations

import functools
import json
import random
import string
import sysconfig
from pathlib import Path

from apb.model.text import ANSWER_CUE, QUESTION_SEP

TASKS = ("passkey", "niah", "vt")

# A fixed, sorted list of pure-Python stdlib modules (present on CPython 3.10+; any that a
# version lacks or has turned into a package is skipped).
HAYSTACK_FILES = tuple(sorted((
    "argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py", "cmd.py", "code.py",
    "codecs.py", "configparser.py", "contextlib.py", "copy.py", "csv.py", "dataclasses.py",
    "datetime.py", "difflib.py", "dis.py", "enum.py", "fnmatch.py", "fractions.py",
    "ftplib.py", "functools.py", "getopt.py", "gettext.py", "glob.py", "gzip.py", "heapq.py",
    "hmac.py", "inspect.py", "ipaddress.py", "locale.py", "mailbox.py", "numbers.py",
    "operator.py", "optparse.py", "pickle.py", "pprint.py", "queue.py", "random.py", "sched.py",
    "secrets.py", "selectors.py", "shlex.py", "shutil.py", "socket.py", "statistics.py",
    "string.py", "subprocess.py", "tarfile.py", "tempfile.py", "textwrap.py", "threading.py",
    "timeit.py", "tokenize.py", "trace.py", "traceback.py", "typing.py", "uuid.py",
    "warnings.py", "weakref.py",
)))

# Keys for ``niah``: plain English nouns.
KEY_WORDS = tuple(sorted(set("""
apple anchor badge basket beacon blanket bottle bridge bucket butter button cabin camera candle
canvas carpet castle cellar cherry circle closet cloud copper cotton crayon desert dragon
engine falcon feather fiddle forest fossil garden garlic ginger glacier hammer harbor helmet
island jacket jungle kettle ladder lantern lemon letter magnet marble meadow mirror monkey
needle orange oyster paddle parrot pebble pencil pepper pillow planet pocket puzzle rabbit
rocket saddle salmon silver spider stable string summer tablet teapot temple thunder ticket
tiger timber tomato tunnel turtle valley velvet violin wagon walnut window winter wizard
yellow zebra
""".split())))

PASSKEY_QUESTION = "What is the pass key?"

# Names for ``vt``: 3 capital letters, from a fixed list so that the project's tokenizer keeps
# each one a single token (copying a name is then one token, wherever it occurs).
def _make_var_names(n: int) -> tuple[str, ...]:
    rng = random.Random("var-names")
    names: set[str] = set()
    while len(names) < n:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(3))
        if name != "VAR":
            names.add(name)
    return tuple(sorted(names))


VAR_NAMES = _make_var_names(160)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def haystack_lines() -> tuple[str, ...]:
    """Non-blank lines (each ending in ``\\n``) of :data:`HAYSTACK_FILES`, in list order."""
    root = stdlib_dir()
    lines: list[str] = []
    for rel in HAYSTACK_FILES:
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # not on this version: skip
        lines.extend(line.rstrip() + "\n" for line in text.splitlines() if line.strip())
    if not lines:
        raise RuntimeError(f"no haystack files found under {root}")
    return tuple(lines)


def haystack_text(max_chars: int | None = None) -> str:
    """The haystack as one string (the tokenizer's training text)."""
    text = "".join(haystack_lines())
    return text if max_chars is None else text[:max_chars]


class _Haystack:
    """Haystack lines with their token counts under one tokenizer."""

    def __init__(self, tokenizer):
        self.lines = haystack_lines()
        ids = tokenizer(list(self.lines), add_special_tokens=False)["input_ids"]
        self.counts = [len(x) for x in ids]

    def take(self, n_tokens: int, start: int) -> list[str]:
        """Consecutive lines from ``start`` (wrapping) totalling about ``n_tokens`` (per-line counts)."""
        out: list[str] = []
        i, total = start, 0
        while total < n_tokens:
            c = self.counts[i]
            if total + c > n_tokens and total + c - n_tokens > n_tokens - total:
                break  # stopping short is closer to the target than taking this line
            out.append(self.lines[i])
            total += c
            i = (i + 1) % len(self.lines)
        return out


_HAYSTACKS: dict[int, tuple[object, _Haystack]] = {}


def _haystack_for(tokenizer) -> _Haystack:
    hit = _HAYSTACKS.get(id(tokenizer))
    if hit is None or hit[0] is not tokenizer:
        hit = (tokenizer, _Haystack(tokenizer))
        _HAYSTACKS[id(tokenizer)] = hit
    return hit[1]


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _value(rng: random.Random, used: set[int]) -> int:
    while True:
        v = rng.randint(10000, 99999)
        if v not in used:
            used.add(v)
            return v


def _var_name(rng: random.Random, used: set[str]) -> str:
    while True:
        name = rng.choice(VAR_NAMES)
        if name not in used:
            used.add(name)
            return name


def _assemble(tokenizer, n_tokens: int, rng: random.Random, needles: list[tuple[float, str]],
              query_tokens: int) -> str:
    """Haystack sized so bos + context + queries is about ``n_tokens``; needles at their depths.

    ``needles`` are (depth in [0, 1], line text without newline); ``query_tokens`` is the token
    count of everything after the context.
    """
    target = n_tokens - 1 - query_tokens
    haystack = _haystack_for(tokenizer)
    start = rng.randrange(len(haystack.lines))
    # Tokenised jointly, lines come out a little shorter than their per-line counts (runs of
    # whitespace merge across line ends), so the haystack budget is corrected twice.
    budget = target - sum(_n_tokens(tokenizer, text + "\n") for _, text in needles)
    for _ in range(3):
        context = _place(haystack.take(budget, start), needles)
        actual = _n_tokens(tokenizer, context)
        if abs(actual - target) <= max(2, target // 200) or budget <= 0:
            break
        budget += target - actual
    return context


def _place(lines: list[str], needles: list[tuple[float, str]]) -> str:
    """Haystack lines with each needle inserted before line ``round(depth * len(lines))``.

    Positions are computed on the haystack alone, and needles at one position keep their
    depth order (then list order), so a chain's links always appear in chain order.
    """
    at: dict[int, list[tuple[float, int, str]]] = {}
    for order, (depth, text) in enumerate(needles):
        at.setdefault(round(depth * len(lines)), []).append((depth, order, text))
    out: list[str] = []
    for i in range(len(lines) + 1):
        out.extend(text + "\n" for _, _, text in sorted(at.get(i, [])))
        if i < len(lines):
            out.append(lines[i])
    return "".join(out).rstrip("\n")


def _query_tokens(tokenizer, question: str) -> int:
    return _n_tokens(tokenizer, QUESTION_SEP + question + ANSWER_CUE)


def passkey_parts(rng: random.Random, used_values: set[int]):
    v = _value(rng, used_values)
    return [(rng.random(), f"The pass key is {v}.")], PASSKEY_QUESTION, str(v)


def niah_parts(rng: random.Random, n_needles: int, used_values: set[int], used_keys: set[str]):
    """``n_needles`` key-value needles; returns (needles, [(question, answer) for each key])."""
    needles, qa = [], []
    for _ in range(n_needles):
        key = rng.choice([k for k in KEY_WORDS if k not in used_keys])
        used_keys.add(key)
        v = _value(rng, used_values)
        needles.append((rng.random(), f"The value of key {key} is {v}."))
        qa.append((f"What is the value of key {key}?", str(v)))
    return needles, qa


def vt_parts(rng: random.Random, n_vars: int, used_values: set[int], used_names: set[str],
             spread: bool = True):
    """One chain of ``n_vars`` variables holding a fresh value; returns (needles, question, answer).

    With ``spread`` link i lies in the i-th of ``n_vars`` equal slices of the context; otherwise
    the links lie at sorted random depths.
    """
    v = _value(rng, used_values)
    names = [_var_name(rng, used_names) for _ in range(n_vars)]
    if spread:
        depths = [(i + rng.random()) / n_vars for i in range(n_vars)]
    else:
        depths = sorted(rng.random() for _ in range(n_vars))
    texts = [f"VAR {names[0]} = {v}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, n_vars)]
    return list(zip(depths, texts)), f"Which variables are assigned the value {v}?", " ".join(names)


def make_example(task: str, n_tokens: int, tokenizer, rng: random.Random, idx: int = 0) -> dict:
    """One document of ``task`` whose prompt is about ``n_tokens`` tokens of ``tokenizer``."""
    values: set[int] = set()
    if task == "passkey":
        needles, question, answer = passkey_parts(rng, values)
    elif task == "niah":
        needles, qa = niah_parts(rng, rng.randint(4, 8), values, set())
        question, answer = rng.choice(qa)
    elif task == "vt":
        names: set[str] = set()
        needles, question, answer = vt_parts(rng, 4, values, names, spread=True)
        distractor, _, _ = vt_parts(rng, 4, values, names, spread=False)
        needles = needles + distractor
    else:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    context = _assemble(tokenizer, n_tokens, rng, needles, _query_tokens(tokenizer, question))
    return {"id": f"{task}-{n_tokens}-{idx}", "context": context, "question": question, "answer": answer}


def make_training_sequence(n_tokens: int, tokenizer, rng: random.Random,
                           needle_fraction: float = 0.5) -> tuple[str, list[tuple[str, str]]]:
    """A dense training document: needles of all three tasks, then all their questions.

    Returns (context, [(question, answer), ...]); the questions come in random order after the
    context, each followed by its answer and eos (see :mod:`apb.tools.train_retrieval`). Needles and
    question/answer pairs take about ``needle_fraction`` of the ``n_tokens``; haystack fills the
    rest. Cost estimates per item (tokens of the project's tokenizer): a key-value needle and its
    Q/A ~25, a passkey ~22, a 2-5 variable chain and its Q/A ~7 per variable + 20.
    """
    budget = needle_fraction * n_tokens
    values: set[int] = set()
    keys: set[str] = set()
    names: set[str] = set()
    needles: list[tuple[float, str]] = []
    qa: list[tuple[str, str]] = []
    if rng.random() < 0.5:
        n, q, a = passkey_parts(rng, values)
        needles += n
        qa.append((q, a))
        budget -= 22
    n_chains = rng.randint(1, 1 + n_tokens // 512)
    for _ in range(n_chains):
        n_vars = rng.randint(2, 5)
        if budget < 7 * n_vars + 20:
            break
        n, q, a = vt_parts(rng, n_vars, values, names, spread=rng.random() < 0.5)
        needles += n
        qa.append((q, a))
        budget -= 7 * n_vars + 20
    n_kv = max(1, min(len(KEY_WORDS) - 1, int(budget // 25)))
    n, pairs = niah_parts(rng, n_kv, values, keys)
    needles += n
    qa += pairs
    if n_chains and rng.random() < 0.5:  # an unasked distractor chain
        n, _, _ = vt_parts(rng, rng.randint(2, 5), values, names, spread=False)
        needles += n
    rng.shuffle(qa)
    q_tokens = sum(_query_tokens(tokenizer, q) + _n_tokens(tokenizer, " " + a) + 1 for q, a in qa)
    context = _assemble(tokenizer, n_tokens, rng, needles, q_tokens)
    return context, qa


def write_dataset(path: str | Path, task_names: list[str], n: int, n_tokens: int, tokenizer, seed: int = 0) -> Path:
    """Write ``n`` documents of each task at about ``n_tokens`` tokens as JSONL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for task in task_names:
            rng = random.Random(f"{task}:{n_tokens}:{seed}")
            for i in range(n):
                f.write(json.dumps(make_example(task, n_tokens, tokenizer, rng, idx=i)) + "\n")
    return path


def score(pred: str, answer: str) -> bool:
    """Exact match after stripping surrounding whitespace."""
    return pred.strip() == answer.strip()


def main(argv=None) -> None:
    """``python -m apb.tools.tasks --out FILE`` writes a dataset (this is how apb/data/demo.jsonl is made)."""
    import argparse

    from apb.model.loading import resolve_model
    from apb.model.text import load_tokenizer

    p = argparse.ArgumentParser(description="write generated task documents as JSONL")
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--n", type=int, default=2, help="documents per task")
    p.add_argument("--length", type=int, default=2048, help="prompt tokens, under the model's tokenizer")
    p.add_argument("--model", default="apb-retrieval", help="whose tokenizer measures the length")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    names = [t for t in args.tasks.split(",") if t]
    bad = [t for t in names if t not in TASKS]
    if bad:
        raise SystemExit(f"--tasks: unknown {', '.join(bad)}; valid tasks: {', '.join(TASKS)}")
    tok = load_tokenizer(resolve_model(args.model))
    print(write_dataset(args.out, names, args.n, args.length, tok, args.seed))


if __name__ == "__main__":
    main()

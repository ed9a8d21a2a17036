"""Seeded long-context retrieval tasks (after RULER), in two styles, and their scoring.

Each generator is pure: it takes a tokenizer, a target prompt length in *tokens* of that
tokenizer, and a ``random.Random``, and returns a document ``{"id", "context", "question",
"answer"}`` that :func:`apb.model.text.encode_document` turns into a prompt. The haystack is
real text present on every machine (:mod:`apb.tools.haystack`). A style is a haystack and a
phrasing of needles and questions (:data:`STYLES`):

``code``
    Python standard-library source, cut at line boundaries; needles are lines of their own,
    phrased as the retrieval model trained here (:mod:`apb.tools.retrieval`) learned them. Its
    documents must not change: that model, ``apb/data/demo.jsonl`` and their tests rely on them.
    The prompt length counted is bos + context + the plain ``Question:``/``Answer:`` query.
``chat``
    English narrative prose (everyday scenes generated from templates, see
    :func:`apb.tools.haystack.story_paragraphs`), cut at sentence boundaries; needles are
    sentences of their own, phrased as RULER phrases them, and each question says what form the
    answer takes, so a small instruct model answers in a form that can be scored. The prompt
    length counted is the whole prompt :func:`encode_document` builds (with the chat template,
    when the tokenizer has one).
``chat-docs``
    The same phrasing over technical prose (the language reference's topics, which ``pydoc``
    ships). Harder for a small model, which reads "pass key" as a Python term there (SmolLM2-135M
    answered "The pass key is a Python feature ..."); the first accuracy figures in
    ``docs/accuracy.md`` were measured on it.

Tasks, and what each tests (code phrasing; chat phrasing in :data:`CHAT`):

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

:func:`score` is RULER's string match by default (the expected string occurs in the prediction;
for ``vt`` every name does, see :func:`expected`), or exact match. :func:`write_dataset` writes
JSONL. :func:`make_training_sequence` is the dense training mixture (many needles of all three
kinds, then many question/answer pairs, code style) used by :mod:`apb.tools.retrieval`.
"""

from __future__ import annotations

import argparse
import json
import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from apb.model.catalog import resolve_model
from apb.model.text import ANSWER_CUE, QUESTION_SEP, encode_document, load_tokenizer
from apb.tools.haystack import haystack_for, haystack_lines, haystack_text  # noqa: F401  (re-exported)

TASKS = ("passkey", "niah", "vt")

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


@dataclass(frozen=True)
class Phrasing:
    """How a style words needles and questions: ``{value}``, ``{key}``, ``{name}``, ``{prev}`` are filled in."""

    passkey_needle: str
    passkey_question: str
    niah_needle: str
    niah_question: str
    vt_first: str
    vt_link: str
    vt_question: str
    #: per task, a paragraph that opens the context (RULER's task instructions); none in ``code``
    preambles: dict[str, str] = field(default_factory=dict)


CODE = Phrasing(
    passkey_needle="The pass key is {value}.",
    passkey_question=PASSKEY_QUESTION,
    niah_needle="The value of key {key} is {value}.",
    niah_question="What is the value of key {key}?",
    vt_first="VAR {name} = {value}.",
    vt_link="VAR {name} = VAR {prev}.",
    vt_question="Which variables are assigned the value {value}?",
)

CHAT = Phrasing(
    passkey_needle="The pass key is {value}. Remember it. {value} is the pass key.",
    passkey_question="What is the pass key? Answer with the number only.",
    niah_needle="One of the special magic numbers for {key} is: {value}.",
    niah_question="What is the special magic number for {key} mentioned in the provided text? "
                  "Answer with the number only.",
    vt_first="VAR {name} = {value}.",
    vt_link="VAR {name} = VAR {prev}.",
    vt_question="Find all variables that are assigned the value {value}. "
                "Answer with the variable names only, separated by spaces.",
    preambles={
        "passkey": "There is an important piece of information hidden inside a lot of irrelevant text. "
                   "Find it and memorize it. I will quiz you about the important information there.",
        "niah": "Some special magic numbers are hidden within the following text. Make sure to memorize "
                "them. I will quiz you about the numbers afterwards.",
        "vt": "Memorize and track the chain(s) of variable assignment hidden in the following text.",
    },
)

#: style -> (haystack source, phrasing)
STYLES: dict[str, tuple[str, Phrasing]] = {"code": ("code", CODE), "chat": ("story", CHAT), "chat-docs": ("prose", CHAT)}

#: tasks whose answer is a set of names, each of which must occur (RULER's "string match all")
MATCH_ALL_TASKS = frozenset({"vt"})

SCORING = ("contains", "exact")


def default_style(tokenizer) -> str:
    """``chat`` when the tokenizer has a chat template (an instruct model), else ``code``."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "code"


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
    """Code haystack sized so bos + context + queries is about ``n_tokens``; needles at their depths.

    ``needles`` are (depth in [0, 1], line text without newline); ``query_tokens`` is the token
    count of everything after the context.
    """
    haystack = haystack_for(tokenizer, "code")
    start = haystack.random_start(rng)
    return haystack.fit(needles, n_tokens - 1 - query_tokens, lambda text: _n_tokens(tokenizer, text), start)


def _assemble_prose(tokenizer, n_tokens: int, rng: random.Random, needles: list[tuple[float, str]],
                    question: str, preamble: str, source: str) -> str:
    """Preamble, then prose with needles at their depths, so the whole prompt is about ``n_tokens``."""
    haystack = haystack_for(tokenizer, source)
    start = haystack.random_start(rng)

    def prompt_tokens(context: str) -> int:
        ctx, query = encode_document(tokenizer, context, question)
        return len(ctx) + len(query)

    return haystack.fit(needles, n_tokens, prompt_tokens, start, head=preamble + "\n\n" if preamble else "")


def _query_tokens(tokenizer, question: str) -> int:
    return _n_tokens(tokenizer, QUESTION_SEP + question + ANSWER_CUE)


def passkey_parts(rng: random.Random, used_values: set[int], phrasing: Phrasing = CODE):
    v = _value(rng, used_values)
    return [(rng.random(), phrasing.passkey_needle.format(value=v))], phrasing.passkey_question, str(v)


def niah_parts(rng: random.Random, n_needles: int, used_values: set[int], used_keys: set[str],
               phrasing: Phrasing = CODE):
    """``n_needles`` key-value needles; returns (needles, [(question, answer) for each key])."""
    needles, qa = [], []
    for _ in range(n_needles):
        key = rng.choice([k for k in KEY_WORDS if k not in used_keys])
        used_keys.add(key)
        v = _value(rng, used_values)
        needles.append((rng.random(), phrasing.niah_needle.format(key=key, value=v)))
        qa.append((phrasing.niah_question.format(key=key), str(v)))
    return needles, qa


def vt_parts(rng: random.Random, n_vars: int, used_values: set[int], used_names: set[str],
             spread: bool = True, phrasing: Phrasing = CODE):
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
    texts = [phrasing.vt_first.format(name=names[0], value=v)]
    texts += [phrasing.vt_link.format(name=names[i], prev=names[i - 1]) for i in range(1, n_vars)]
    return list(zip(depths, texts)), phrasing.vt_question.format(value=v), " ".join(names)


def make_example(task: str, n_tokens: int, tokenizer, rng: random.Random, idx: int = 0, style: str = "code") -> dict:
    """One document of ``task`` in ``style`` whose prompt is about ``n_tokens`` tokens of ``tokenizer``."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; styles: {', '.join(STYLES)}")
    source, phrasing = STYLES[style]
    values: set[int] = set()
    if task == "passkey":
        needles, question, answer = passkey_parts(rng, values, phrasing)
    elif task == "niah":
        needles, qa = niah_parts(rng, rng.randint(4, 8), values, set(), phrasing)
        question, answer = rng.choice(qa)
    elif task == "vt":
        names: set[str] = set()
        needles, question, answer = vt_parts(rng, 4, values, names, spread=True, phrasing=phrasing)
        distractor, _, _ = vt_parts(rng, 4, values, names, spread=False, phrasing=phrasing)
        needles = needles + distractor
    else:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if source == "code":
        context = _assemble(tokenizer, n_tokens, rng, needles, _query_tokens(tokenizer, question))
    else:
        context = _assemble_prose(tokenizer, n_tokens, rng, needles, question, phrasing.preambles.get(task, ""),
                                  source)
    return {"id": f"{task}-{n_tokens}-{idx}", "context": context, "question": question, "answer": answer}


def make_training_sequence(n_tokens: int, tokenizer, rng: random.Random,
                           needle_fraction: float = 0.5) -> tuple[str, list[tuple[str, str]]]:
    """A dense training document: needles of all three tasks, then all their questions.

    Returns (context, [(question, answer), ...]); the questions come in random order after the
    context, each followed by its answer and eos (see :mod:`apb.tools.retrieval`). Needles and
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


def write_dataset(path: str | Path, task_names: list[str], n: int, n_tokens: int, tokenizer, seed: int = 0,
                  style: str = "code") -> Path:
    """Write ``n`` documents of each task at about ``n_tokens`` tokens as JSONL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for task in task_names:
            rng = random.Random(f"{task}:{n_tokens}:{seed}")
            for i in range(n):
                f.write(json.dumps(make_example(task, n_tokens, tokenizer, rng, idx=i, style=style)) + "\n")
    return path


def expected(task: str, answer: str | Sequence[str]) -> str | list[str]:
    """What :func:`score` looks for: for a :data:`MATCH_ALL_TASKS` task, each name on its own."""
    return answer.split() if task in MATCH_ALL_TASKS and isinstance(answer, str) else answer


def score(pred: str, answer: str | Sequence[str], mode: str = "contains") -> bool:
    """Whether the prediction ``pred`` gives ``answer``.

    ``contains`` (RULER's string match): the expected string occurs in the prediction, case and
    surrounding whitespace ignored, so "The pass key is 86638." answers ``86638``. A list of
    strings counts when every one occurs (RULER's "string match all", all or nothing; vt's
    names via :func:`expected`). An empty expected string matches only an empty prediction.
    ``exact``: equal after stripping surrounding whitespace (a list: its items joined by spaces).
    """
    if mode == "exact":
        want = answer if isinstance(answer, str) else " ".join(answer)
        return pred.strip() == want.strip()
    if mode != "contains":
        raise ValueError(f"unknown scoring mode {mode!r}; modes: {', '.join(SCORING)}")
    wants = [answer] if isinstance(answer, str) else list(answer)
    got = pred.strip().casefold()
    return bool(wants) and all((w.strip().casefold() in got) if w.strip() else not got for w in wants)


def main(argv=None) -> None:
    """``python -m apb.tools.tasks --out FILE`` writes a dataset (this is how apb/data/demo.jsonl is made)."""
    p = argparse.ArgumentParser(description="write generated task documents as JSONL")
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--n", type=int, default=2, help="documents per task")
    p.add_argument("--length", type=int, default=2048, help="prompt tokens, under the model's tokenizer")
    p.add_argument("--model", default="apb-retrieval", help="whose tokenizer measures the length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--style", choices=("auto", *STYLES), default="auto",
                   help="haystack and phrasing; auto: chat if the tokenizer has a chat template, else code")
    args = p.parse_args(argv)
    names = [t for t in args.tasks.split(",") if t]
    bad = [t for t in names if t not in TASKS]
    if bad:
        raise SystemExit(f"--tasks: unknown {', '.join(bad)}; valid tasks: {', '.join(TASKS)}")
    tok = load_tokenizer(resolve_model(args.model))
    style = default_style(tok) if args.style == "auto" else args.style
    print(write_dataset(args.out, names, args.n, args.length, tok, args.seed, style))


if __name__ == "__main__":
    main()

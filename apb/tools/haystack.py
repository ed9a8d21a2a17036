"""Haystack text for the task documents, and needles fitted into it at a token length.

Two sources, both on every machine with nothing to download, read in a fixed, sorted order (a
seed gives the same document wherever the Python version is the same):

``code``
    The standard library's own source (:data:`HAYSTACK_FILES`), cut into lines. The retrieval
    model trained here (:mod:`apb.tools.retrieval`) read this text; its documents keep it.
``prose``
    English: the language reference's topic texts that ``pydoc`` ships (``pydoc_data.topics``,
    a dict of about 80 documents), with grammar blocks, code examples, titles and emphasis marks
    removed, cut into sentences. A chat model reads this as ordinary text.

A :class:`Haystack` is one source cut into units (a line, or a sentence with the space or
paragraph break after it) with each unit's token count under one tokenizer.
:meth:`Haystack.fit` takes consecutive units from a start, places the needles between them and
corrects the amount until the whole prompt, as the caller measures it, has the target length.
"""

from __future__ import annotations

import functools
import itertools
import random
import re
import sysconfig
from pathlib import Path
from typing import Callable

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

SOURCES = ("code", "prose", "story")


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
    """The code haystack as one string (the retrieval tokenizer's training text)."""
    text = "".join(haystack_lines())
    return text if max_chars is None else text[:max_chars]


# *emphasis* and **strong** around a word or phrase (not the ***** under a title)
_EMPHASIS = re.compile(r"(?<![\w*])\*{1,2}(?=[^\s*])([^*\n]+?)(?<=[^\s*])\*{1,2}(?![\w*])")
# a sentence ends at . ! or ? followed by space and a capital (so "e.g. the" does not split)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“(])")
_UNDERLINE = re.compile(r"^\s*([*=\-^~])\1{2,}\s*$")
# sentences that could pass for a needle or an answer, or lure a small model into one: numbers,
# the needles' and questions' words, and code (SmolLM2-135M answered "The pass key is "pass"."
# and "... is "def __call__(" from Python's own prose about its ``pass`` statement and methods)
_NEEDLE_LIKE = re.compile(r"\bpass(es|ed|ing)?\b|\bkeys?\b|\bNone\b|\bspecial\b|\bmagic\b|\bVAR\b|\bdef\b"
                          r"|[0-9_\"'`]", re.IGNORECASE)
_MIN_PARAGRAPH = 40  # characters: shorter blocks are notes ("New in version 3.5.", "For example:")
# a longer sentence (a list of attributes) is dropped: a unit this long would make lengths coarse
_MAX_WORDS = 60
_MIN_INTRO_WORDS = 6  # a shorter sentence ending in ":" is only a pointer to the example


def _prose_paragraphs(text: str) -> list[tuple[str, ...]]:
    """The prose paragraphs of one pydoc topic, each as its sentences.

    pydoc renders reStructuredText as plain text: a title is a line underlined with ``*`` or
    ``=``, grammar rules and code examples are blocks with ragged indentation, a method's
    description is a block indented as one, bullets start ``* ``. Kept: the blocks indented as
    one that start with a capital, end with ``.`` or ``:`` and hold no prompt or grammar rule;
    unwrapped, with bullet marks and emphasis asterisks removed. A closing sentence that
    introduced an example (ending ``:``) ends with ``.`` instead, or is dropped when short
    ("For example:"); so are short notes ("New in version 3.5."), sentences that look like a
    needle or lure toward a wrong answer (``_NEEDLE_LIKE``) and sentences too long to be a fine unit
    of length.
    """
    out = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = block.strip("\n").splitlines()
        if not lines or len({len(line) - len(line.lstrip()) for line in lines}) != 1 \
                or any(_UNDERLINE.match(line) for line in lines):
            continue
        para = re.sub(r"\s+", " ", " ".join(lines)).strip().removeprefix("* ")
        para = _EMPHASIS.sub(r"\1", para)
        if not (para[:1].isupper() and para.endswith((".", ":"))) or ">>>" in para or "::=" in para \
                or len(para) < _MIN_PARAGRAPH:
            continue
        sentences = _SENTENCE_END.split(para)
        if para.endswith(":"):  # it introduced an example: drop "For example:", end a longer one with "."
            last = sentences.pop()
            if len(last.split()) >= _MIN_INTRO_WORDS:
                sentences.append(last[:-1] + ".")
        sentences = tuple(s for s in sentences if not _NEEDLE_LIKE.search(s) and len(s.split()) <= _MAX_WORDS)
        if sentences:
            out.append(sentences)
    return out


@functools.lru_cache(maxsize=1)
def prose_paragraphs() -> tuple[tuple[str, ...], ...]:
    """Every prose paragraph of ``pydoc_data.topics``, topics in sorted order."""
    try:
        from pydoc_data.topics import topics  # on use: only the prose haystack needs it, and it may be absent
    except ImportError as e:  # some distributions split pydoc_data out of the standard library
        raise RuntimeError(f"the prose haystack needs the standard library's pydoc_data ({e}); install "
                           "your distribution's full Python standard library, or use the code haystack") from None
    paras = [p for key in sorted(topics) for p in _prose_paragraphs(topics[key])]
    if not paras:
        raise RuntimeError("pydoc_data.topics holds no prose paragraphs")
    return tuple(paras)


# Everyday narrative prose generated from templates: nothing technical for a small chat model to
# confuse with the question ("The pass key is a Python feature ...", as SmolLM2 answered over
# Python's own documentation), no digits, and none of the needles' words.
def _choices(text: str) -> tuple[str, ...]:
    return tuple(" ".join(x.split()) for x in text.split("|"))


_NAMES = tuple("""Anna Ben Clara Daniel Elena Felix Grace Henry Iris Jonah Kate Leo Maya Nora Oscar Paula
Quinn Rosa Simon Tara Victor Wendy Adam Beth Carl Dora Emil Fiona Hugo Ines Jack Lena Martin Nina
Owen Petra Rita Samuel Teresa Walter""".split())
_PLACES = _choices("""the market|the harbor|the old mill|the village square|the bakery|the library|the orchard|
the train station|the riverbank|the hill above the town|the school yard|the little chapel|the
bridge|the garden behind the house|the fishing pier|the meadow|the bookshop|the post office|the
farm lane|the forest path|the lighthouse|the pottery workshop|the town hall|the boathouse""")
_TIMES = _choices("""Early in the morning|Late in the afternoon|Just before supper|On a cold winter evening|
At the end of the summer|One quiet Sunday|When the rain finally stopped|After the harvest|On the
first warm day of spring|Long after sunset|Before the shops opened|During the autumn fair""")
_THINGS = _choices("""a basket of apples|a wool scarf|an old map|a jar of honey|a bundle of letters|a loaf of
bread|a pair of boots|a wooden box|a bunch of flowers|a small lantern|a fishing net|a blue umbrella|
a sketchbook|a bag of flour|a clay pot|a kite|a warm blanket|a fiddle|a pot of soup|a straw hat""")
_PEOPLE = _choices("""the baker|the fisherman|an old neighbor|the teacher|a traveling musician|the miller's
daughter|the shopkeeper|a young shepherd|the carpenter|the doctor|a stranger in a grey coat|the
innkeeper|the gardener|the blacksmith|a group of children|the ferryman""")
_WEATHER = _choices("""a soft wind moved through the trees|the clouds hung low over the roofs|the sun warmed
the stone walls|a light snow covered the fields|fog drifted in from the sea|the air smelled of rain|
the sky turned a deep orange|the river ran high and fast|frost glittered on the grass|the swallows
flew low over the water""")
_FEELINGS = _choices("""happy|tired|curious|calm|restless|grateful|worried|hopeful|cheerful|thoughtful""")
_ACTS = _choices("""mend the fence|paint the kitchen door|bake bread for the neighbors|write a long letter home|
sort the old photographs|plant beans in the garden|repair the roof of the shed|read by the window|
walk the dog along the river|tune the old piano|knit a sweater for the winter|clean the attic|cook
a large dinner for friends|feed the chickens|carve a small wooden bird|learn a new song""")
_TEMPLATES = (
    "{time}, {name} went to {place} with {thing}.",
    "On the way, {name} met {person}, who talked about the weather and the coming season.",
    "{weather_cap}, and {name} felt {feeling}.",
    "{name} had promised to {act} before the end of the week.",
    "At {place}, {person} was already waiting near the door.",
    "They spoke for a while about {place} and the people who used to live nearby.",
    "{name} remembered how {friend} once carried {thing} all the way to {place}.",
    "Nobody in the family could quite explain why {friend} loved {place} so much.",
    "By evening {name} had decided to {act} the next day.",
    "{person_cap} laughed and said that {place} had not changed at all in many years.",
    "{time}, {weather}.",
    "{friend} arrived a little later, carrying {thing} and a letter from a cousin.",
    "The two of them sat by the fire and planned to {act} together.",
    "It was a {feeling} time, and {name} would think of it often.",
    "{name} left {thing} with {person} and walked slowly back along the road.",
    "Later, {friend} wrote that {place} looked lovely when {weather}.",
)


@functools.lru_cache(maxsize=1)
def story_paragraphs(n_paragraphs: int = 400, seed: str = "story") -> tuple[tuple[str, ...], ...]:
    """``n_paragraphs`` paragraphs of generated everyday narrative, each as its sentences (fixed by ``seed``)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_paragraphs):
        name, friend = rng.sample(_NAMES, 2)
        sentences = []
        for template in rng.sample(_TEMPLATES, rng.randint(4, 7)):
            weather = rng.choice(_WEATHER)
            person = rng.choice(_PEOPLE)
            s = template.format(name=name, friend=friend, place=rng.choice(_PLACES), time=rng.choice(_TIMES),
                                thing=rng.choice(_THINGS), person=person, person_cap=person[0].upper() + person[1:],
                                weather=weather, weather_cap=weather[0].upper() + weather[1:],
                                feeling=rng.choice(_FEELINGS), act=rng.choice(_ACTS))
            sentences.append(s)
        out.append(tuple(sentences))
    return tuple(out)


def prose_units(source: str = "prose") -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(sentences each followed by ``" "`` or, at a paragraph's end, ``"\\n\\n"``; paragraph starts)."""
    units: list[str] = []
    starts: list[int] = []
    for para in (prose_paragraphs() if source == "prose" else story_paragraphs()):
        starts.append(len(units))
        units.extend(s + " " for s in para[:-1])
        units.append(para[-1] + "\n\n")
    return tuple(units), tuple(starts)


class Haystack:
    """One source's units with their token counts under one tokenizer.

    ``sep`` follows each needle (a needle is a line of code, or a sentence of prose); ``starts``
    are the units a document may begin at (any line; the first sentence of a paragraph). With
    ``fine`` (prose), the haystack may end in the first words of a sentence and :meth:`fit`
    keeps its closest attempt, so the length comes within a few tokens of the target even for a
    tokenizer whose sentences are long (a byte tokenizer); code keeps whole lines and its last
    attempt, as the documents the trained retrieval model was tested on were made.
    """

    def __init__(self, tokenizer, source: str):
        if source == "code":
            self.units, self.sep, self.fine = haystack_lines(), "\n", False
            self.starts: tuple[int, ...] | range = range(len(self.units))
        elif source in ("prose", "story"):
            (self.units, self.starts), self.sep, self.fine = prose_units(source), " ", True
        else:
            raise ValueError(f"unknown haystack source {source!r}; sources: {', '.join(SOURCES)}")
        self.tokenizer = tokenizer
        ids = tokenizer(list(self.units), add_special_tokens=False)["input_ids"]
        self.counts = [len(x) for x in ids]

    def n_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def random_start(self, rng: random.Random) -> int:
        return self.starts[rng.randrange(len(self.starts))]

    def take(self, n_tokens: int, start: int) -> list[str]:
        """Consecutive units from ``start`` (wrapping) totalling about ``n_tokens`` (per-unit counts)."""
        out: list[str] = []
        i, total = start, 0
        while total < n_tokens:
            c = self.counts[i]
            if total + c > n_tokens and self.fine:
                words = self.units[i].split()
                words = words[:int(len(words) * (n_tokens - total) / c)]
                if words:  # the first words of the sentence, closed as one
                    out.append(" ".join(words).rstrip(",;:") + ". ")
                break
            if total + c > n_tokens and total + c - n_tokens > n_tokens - total:
                break  # stopping short is closer to the target than taking this unit
            out.append(self.units[i])
            total += c
            i = (i + 1) % len(self.units)
        return out

    def place(self, units: list[str], needles: list[tuple[float, str]]) -> str:
        """``units`` with each needle inserted at its depth: before unit ``round(depth * len(units))``,
        or with ``fine``, at the unit boundary nearest ``depth`` of the haystack's tokens.

        Positions are computed on the haystack alone, and needles at one position keep their
        depth order (then list order), so a chain's links always appear in chain order.
        """
        if self.fine:  # sentences vary in length: count depth in tokens, as RULER does
            ends = list(itertools.accumulate(len(x) for x in self.tokenizer(units, add_special_tokens=False)[
                "input_ids"])) if units else []
            bounds = [0, *ends]

            def position(depth: float) -> int:
                return min(range(len(bounds)), key=lambda i: abs(bounds[i] - depth * bounds[-1]))
        else:
            def position(depth: float) -> int:
                return round(depth * len(units))
        at: dict[int, list[tuple[float, int, str]]] = {}
        for order, (depth, text) in enumerate(needles):
            at.setdefault(position(depth), []).append((depth, order, text))
        out: list[str] = []
        for i in range(len(units) + 1):
            out.extend(text + self.sep for _, _, text in sorted(at.get(i, [])))
            if i < len(units):
                out.append(units[i])
        return "".join(out).rstrip()

    def fit(self, needles: list[tuple[float, str]], target: int, measure: Callable[[str], int], start: int,
            head: str = "") -> str:
        """``head`` + haystack from ``start`` with ``needles`` placed, sized so ``measure`` gives ``target``.

        ``measure(context)`` is the token count the caller holds to ``target`` (the context alone,
        or the whole prompt). Tokenised jointly, units come out a little shorter or longer than
        their separate counts (whitespace merges across unit ends), so the haystack budget is
        corrected twice.
        """
        budget = target - measure(head) - sum(self.n_tokens(text + self.sep) for _, text in needles)
        best: tuple[int, str] | None = None
        for _ in range(3):
            context = head + self.place(self.take(budget, start), needles)
            actual = measure(context)
            if best is None or abs(actual - target) < best[0]:
                best = (abs(actual - target), context)
            if abs(actual - target) <= max(2, target // 200) or budget <= 0:
                break
            budget += target - actual
        return best[1] if self.fine else context


_CACHE: dict[tuple[int, str], tuple[object, Haystack]] = {}


def haystack_for(tokenizer, source: str) -> Haystack:
    """The :class:`Haystack` of ``source`` under ``tokenizer``, counted once per tokenizer object."""
    hit = _CACHE.get((id(tokenizer), source))
    if hit is None or hit[0] is not tokenizer:
        hit = (tokenizer, Haystack(tokenizer, source))
        _CACHE[(id(tokenizer), source)] = hit
    return hit[1]

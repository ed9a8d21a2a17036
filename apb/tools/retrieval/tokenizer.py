"""The retrieval model's tokenizer: byte-level BPE trained on the haystack text plus a task drill."""

from __future__ import annotations

import random

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from apb.tools import tasks

SPECIALS = ["<pad>", "<s>", "</s>"]


def tokenizer_drill(repeats: int, seed: int = 0) -> str:
    """Task sentences (every key word and variable name, values, question and answer cues).

    Mixed into the tokenizer's training text so that BPE keeps each key word, each variable
    name and each cue word a single token, and learns every 2-digit number with and without
    a leading space (the haystack alone has too few of them). The sentences restate the
    formats of :mod:`apb.tools.tasks` rather than calling its generators, whose random draws would
    change the shipped tokenizer's training text; tests/test_retrieval_model.py checks that
    the shipped tokenizer keeps every task word whole.
    """
    rng = random.Random(f"drill:{seed}")
    lines = []
    for _ in range(repeats):
        for k in tasks.KEY_WORDS:
            v = rng.randint(10000, 99999)
            lines.append(f"The value of key {k} is {v}.\n\nQuestion: What is the value of key {k}?\nAnswer: {v}\n")
        for n in tasks.VAR_NAMES:
            v, m = rng.randint(10000, 99999), rng.choice(tasks.VAR_NAMES)
            lines.append(f"VAR {n} = {v}.\nVAR {m} = VAR {n}.\n\nQuestion: Which variables are assigned the value {v}?"
                         f"\nAnswer: {n} {m}\n")
        v = rng.randint(10000, 99999)
        lines.append(f"The pass key is {v}.\n\nQuestion: {tasks.PASSKEY_QUESTION}\nAnswer: {v}\n")
    pairs = [f"{i:02d}" for i in range(100)]
    lines.append((" ".join(pairs) + " " + "".join(pairs) + "\n") * (repeats * 4))
    return "".join(lines)


def train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    # Digits go in pairs (a 5-digit value is always 3 tokens); everything else is GPT-2 style.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?[0-9]{1,2}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = tasks.haystack_text() + "\n" + tokenizer_drill(40)
    chunk = 1 << 16
    tok.train_from_iterator((text[i:i + chunk] for i in range(0, len(text), chunk)), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        model_max_length=8192)
    whole = [f" {w}" for w in tasks.KEY_WORDS + tasks.VAR_NAMES]
    split = [w for w in whole if len(tokenizer(w, add_special_tokens=False)["input_ids"]) != 1]
    if split:
        raise RuntimeError(f"tokenizer splits {len(split)} task words (e.g. {split[:5]}); raise --vocab")
    return tokenizer

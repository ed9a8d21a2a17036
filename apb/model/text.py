"""Text in, token ids out: tokenizers for presets and the context/query split of a prompt.

A document is ``context`` plus ``question``. The prompt is built with the model's chat
template when it has one (the question follows the context in the user turn, and the
assistant header ends the prompt), else as ``context + "\\n\\nQuestion: " + question +
"\\nAnswer:"``. The prompt is tokenised as two parts, so the methods know exactly which tokens
are the query: everything from the question on.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

QUESTION_SEP = "\n\nQuestion: "
ANSWER_CUE = "\nAnswer:"
_MARK = "\u2063APB-SPLIT\u2063"


def byte_tokenizer():
    """A byte-level tokenizer (256 byte symbols + specials): any text, no training."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def load_tokenizer(path: str | Path):
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)


def encode_document(tokenizer, context: str, question: str) -> tuple[list[int], list[int]]:
    """(context ids, query ids) whose concatenation is the model's prompt for this document."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": context + _MARK + question}],
                                             tokenize=False, add_generation_prompt=True)
        head, _, tail = text.partition(_MARK)
        ctx = tokenizer(head, add_special_tokens=False)["input_ids"]
        query = tokenizer("\n\n" + tail, add_special_tokens=False)["input_ids"]
        return ctx, query
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ctx = bos + tokenizer(context, add_special_tokens=False)["input_ids"]
    query = tokenizer(QUESTION_SEP + question + ANSWER_CUE, add_special_tokens=False)["input_ids"]
    return ctx, query


def eos_ids(tokenizer, model_config) -> tuple[int, ...]:
    ids = set()
    for src in (getattr(model_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return tuple(sorted(ids))

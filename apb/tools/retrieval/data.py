"""Supervision layout: token ids and labels (-100 everywhere but the answers and their eos), and batching."""

from __future__ import annotations

import torch

from apb.model.text import ANSWER_CUE, QUESTION_SEP, encode_document


def encode_training(tokenizer, context: str, qa: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """(input ids, labels): labels are -100 except on each answer's tokens and its eos."""
    ids = [tokenizer.bos_token_id] + tokenizer(context, add_special_tokens=False)["input_ids"]
    labels = [-100] * len(ids)
    for q, a in qa:
        qids = tokenizer(QUESTION_SEP + q + ANSWER_CUE, add_special_tokens=False)["input_ids"]
        aids = tokenizer(" " + a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids += qids + aids
        labels += [-100] * len(qids) + aids
    return ids, labels


def encode_example(tokenizer, doc: dict) -> tuple[list[int], list[int]]:
    """An eval document as (prompt + answer + eos, labels on answer + eos)."""
    ctx, query = encode_document(tokenizer, doc["context"], doc["question"])
    aids = tokenizer(" " + doc["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ctx + query + aids, [-100] * (len(ctx) + len(query)) + aids


def collate(pairs, pad_id: int):
    """Right-pad to the longest; no attention mask is needed under causal attention (pads come last)."""
    n = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), n), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), n), -100, dtype=torch.long)
    for i, (x, y) in enumerate(pairs):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
    return ids, labels

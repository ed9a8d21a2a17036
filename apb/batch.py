"""JSONL files in, JSONL files out: :func:`process_file` runs an :class:`~apb.engine.Engine` over
every record of a file, resumably.

Data flow: :func:`read_jsonl` parses the input line by line (a line that is not UTF-8 JSON
becomes a :class:`DocumentError`, answered as an error record, so the batch goes
on); :func:`resume` keeps the records already in the output that are settled (answers, and
``final`` errors: the document itself is at fault, so trying again would fail again), drops the
``transient`` ones (a worker failed) so they are retried, and refuses an output written with
another config (its ``.config.yaml`` sidecar) or with no sidecar at all; each new record is
appended and fsynced as it finishes, so a crash loses at most the document in flight. Every
input is filed under its id (:func:`record_id`; ``line-N`` when it has none), so a re-run
answers each input once. The run is tallied in a :class:`Summary`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Iterator

import yaml
from tqdm import tqdm

from apb.config import Config, ConfigError, dump_config

if TYPE_CHECKING:  # the engine drives batches and imports this module; types only here
    from apb.engine import Engine


#: ``error_kind`` of a record whose document is at fault (kept on resume) ...
FINAL = "final"
#: ... and of one whose workers failed (retried on resume; so is an error record without a kind)
TRANSIENT = "transient"


class DocumentError(ValueError):
    """What is wrong with one input record (a bad line of a file, or a bad field of a record)."""


def record_id(doc: Any, fallback: str) -> str:
    """The id a result is filed under: the record's own (a non-empty string), else ``fallback``."""
    key = doc.get("id") if isinstance(doc, dict) else None
    return key if isinstance(key, str) and key else fallback


@dataclass
class Summary:
    documents: int = 0
    errors: int = 0
    #: inputs whose record was already in the output (answers and kept final errors)
    skipped: int = 0
    #: of those, final error records kept from an earlier run (``retry_errors`` tries them again)
    skipped_errors: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0

    def add(self, rec: dict) -> None:
        """Count one written result record."""
        self.documents += 1
        self.errors += rec["error"] is not None
        self.prefill_s += rec["prefill_s"]
        self.decode_s += rec["decode_s"]
        self.prompt_tokens += rec["prompt_tokens"]

    def __str__(self) -> str:
        kept = f", {self.skipped_errors} of them final errors" if self.skipped_errors else ""
        return (f"{self.documents} documents ({self.errors} errors, {self.skipped} already done{kept}), "
                f"{self.prompt_tokens} prompt tokens, prefill {self.prefill_s:.2f}s, decode {self.decode_s:.2f}s")


def summary_line(summary: Summary) -> str:
    rate = summary.prompt_tokens / summary.prefill_s if summary.prefill_s > 0 else math.nan
    return f"{summary}; {rate:.0f} prompt tokens/s"


def process_file(engine: Engine, in_path: str | Path, out_path: str | Path, progress: bool = True,
                 retry_errors: bool = False) -> Summary:
    """Answer every record of a JSONL file into another, resumably.

    Each result is written and flushed as it finishes. Re-running with the same output keeps the
    answered records and the final errors (all errors are tried again with ``retry_errors``),
    retries the transient ones, and refuses a different config.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise FileNotFoundError(f"input file {str(in_path)!r} does not exist")
    done = resume(out_path, engine.cfg, retry_errors)
    records = list(read_jsonl(in_path))
    summary = Summary()
    bar = tqdm(total=len(records), unit="doc", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    with out_path.open("a", encoding="utf-8") as out:
        for line_no, doc in records:
            key = record_id(doc, f"line-{line_no}")
            if key in done:
                summary.skipped += 1
                summary.skipped_errors += done[key]["error"] is not None
                bar.update(1)
                continue
            if isinstance(doc, DocumentError):
                rec = engine.record(key, error=str(doc))
            else:
                rec = engine.process_one(doc, fallback_id=key)
            _append(out, rec)
            summary.add(rec)
            bar.update(1)
            if summary.prefill_s > 0:
                bar.set_postfix(tok_s=f"{summary.prompt_tokens / summary.prefill_s:.0f}", errors=summary.errors)
    bar.close()
    return summary


def _append(out: IO[str], rec: dict) -> None:
    out.write(json.dumps(rec, ensure_ascii=False) + "\n")
    out.flush()
    os.fsync(out.fileno())  # on disk before the next document starts: a crash loses only the one in flight


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record or DocumentError) for each non-blank line."""
    with path.open("rb") as f:
        for no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield no, DocumentError(f"line {no} is not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            try:
                yield no, json.loads(text)
            except json.JSONDecodeError as e:
                yield no, DocumentError(f"line {no} is not valid JSON: {e.msg} at column {e.colno}")


def resume(out_path: Path, cfg: Config, retry_errors: bool = False) -> dict[str, dict]:
    """The records of ``out_path`` that stay, by id: answers, and final errors unless
    ``retry_errors``. The others (transient errors, and errors written before records had an
    ``error_kind``, to be safe) are dropped from the file so their documents are tried again.

    Refuses an output whose sidecar (``OUT.config.yaml``) holds a different config, or that holds
    records but no sidecar, then writes ``cfg`` there.
    """
    sidecar = Path(f"{out_path}.config.yaml")
    lines = out_path.read_text(encoding="utf-8").splitlines() if out_path.exists() else []
    if sidecar.exists() and out_path.exists():
        before = yaml.safe_load(sidecar.read_text())
        now = Config.model_validate(before).fingerprint() if before else None
        if now != cfg.fingerprint():
            raise ConfigError(f"{out_path} was written with a different config ({sidecar}); the answers would "
                              "mix two configs. Write to a new output file, or delete both files to start over")
    elif any(line.strip() for line in lines):
        raise ConfigError(f"{out_path} holds records but no resolved config beside it ({sidecar}), so there is no "
                          "telling which config wrote them; pass a new output path, or delete "
                          f"{out_path} to start over")
    kept: dict[str, tuple[str, dict]] = {}
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(rec, dict) and isinstance(rec.get("id"), str) and _settled(rec, retry_errors):
            kept[rec["id"]] = (line, rec)
    if out_path.exists():
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line, _ in kept.values()), encoding="utf-8")
        os.replace(tmp, out_path)
    dump_config(cfg, sidecar)
    return {key: rec for key, (_, rec) in kept.items()}


def _settled(rec: dict, retry_errors: bool) -> bool:
    """Whether a record already written stays: an answer, or a final error unless errors are retried."""
    if rec.get("error") is None:
        return True
    return rec.get("error_kind") == FINAL and not retry_errors

"""JSONL files in, JSONL files out: :func:`process_file` runs an :class:`~apb.engine.Engine` over
every record of a file, resumably.

Data flow: :func:`read_jsonl` parses the input line by line (a line that is not UTF-8 JSON
becomes a :class:`DocumentError`, answered as an error record, so the batch goes
on); :func:`resume` keeps the answered records already in the output, drops the failed ones so
they are retried, and refuses an output written with another config (its ``.config.yaml``
sidecar); each new record is appended and fsynced as it finishes, so a crash loses at most the
document in flight. The run is tallied in a :class:`Summary`.
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


class DocumentError(ValueError):
    """What is wrong with one input record (a bad line of a file, or a bad field of a record)."""


@dataclass
class Summary:
    documents: int = 0
    errors: int = 0
    skipped: int = 0
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
        return (f"{self.documents} documents ({self.errors} errors, {self.skipped} already done), "
                f"{self.prompt_tokens} prompt tokens, prefill {self.prefill_s:.2f}s, decode {self.decode_s:.2f}s")


def summary_line(summary: Summary) -> str:
    rate = summary.prompt_tokens / summary.prefill_s if summary.prefill_s > 0 else math.nan
    return f"{summary}; {rate:.0f} prompt tokens/s"


def process_file(engine: Engine, in_path: str | Path, out_path: str | Path, progress: bool = True) -> Summary:
    """Answer every record of a JSONL file into another, resumably.

    Each result is written and flushed as it finishes. Re-running with the same output
    keeps the answered records, retries the failed ones, and refuses a different config.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise FileNotFoundError(f"input file {str(in_path)!r} does not exist")
    done = resume(out_path, engine.cfg)
    records = list(read_jsonl(in_path))
    summary = Summary()
    bar = tqdm(total=len(records), unit="doc", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    with out_path.open("a", encoding="utf-8") as out:
        for i, (line_no, doc) in enumerate(records):
            key = doc.get("id") if isinstance(doc, dict) else None
            if isinstance(key, str) and key in done:
                summary.skipped += 1
                bar.update(1)
                continue
            if isinstance(doc, DocumentError):
                rec = engine.record(f"line-{line_no}", error=str(doc))
            else:
                rec = engine.process_one(doc, index=i)
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


def resume(out_path: Path, cfg: Config) -> set[str]:
    """Ids already answered in ``out_path``; failed records are dropped so they are retried.

    Refuses an output whose sidecar (``OUT.config.yaml``) holds a different config, then writes
    ``cfg`` there.
    """
    sidecar = Path(f"{out_path}.config.yaml")
    if out_path.exists() and sidecar.exists():
        before = yaml.safe_load(sidecar.read_text())
        now = Config.model_validate(before).fingerprint() if before else None
        if now != cfg.fingerprint():
            raise ConfigError(f"{out_path} was written with a different config ({sidecar}); the answers would "
                              "mix two configs. Write to a new output file, or delete both files to start over")
    done: dict[str, str] = {}
    if out_path.exists():
        for line in out_path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if isinstance(rec, dict) and rec.get("error") is None and isinstance(rec.get("id"), str):
                done[rec["id"]] = line
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in done.values()), encoding="utf-8")
        os.replace(tmp, out_path)
    dump_config(cfg, sidecar)
    return set(done)

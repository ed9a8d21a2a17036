"""The Python API for batch document processing: :class:`Engine`.

::

    with apb.Engine.from_config("configs/tiny-cpu.yaml", method="apb") as engine:
        for result in engine.process([{"id": "a", "context": "...", "question": "..."}]):
            print(result["answer"])
        engine.process_file("in.jsonl", "out.jsonl")

The engine validates and tokenises documents on the driver, sends each prompt to a worker
group (local processes, Ray actors, or the processes torchrun started) and turns the decoded
tokens back into text. A bad document becomes an error record and the batch goes on; a worker
that dies fails only the document in flight, and the group is rebuilt for the next one.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

from apb.config import Config, ConfigError, dump_config, load_config
from apb.runtime.decode import Sampling
from apb.model.loading import resolve_model
from apb.model.text import encode_document, eos_ids, load_tokenizer

RESULT_KEYS = ("id", "answer", "method", "world_size", "prompt_tokens", "prefill_s", "decode_s", "error")
_SHORTCUTS = {"method": "method.name", "world_size": "parallel.world_size", "launcher": "parallel.launcher",
              "model": "model.name_or_path", "dtype": "model.dtype", "max_new_tokens": "decode.max_new_tokens",
              "decode_mode": "decode.mode"}


class DocumentError(ValueError):
    """What is wrong with one input record."""


@dataclass
class Summary:
    documents: int = 0
    errors: int = 0
    skipped: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0

    def __str__(self) -> str:
        return (f"{self.documents} documents ({self.errors} errors, {self.skipped} already done), "
                f"{self.prompt_tokens} prompt tokens, prefill {self.prefill_s:.2f}s, decode {self.decode_s:.2f}s")


class Engine:
    def __init__(self, cfg: Config, group=None):
        self.cfg = cfg
        self.model_path = resolve_model(cfg.model.name_or_path, cfg.model.seed)
        from transformers import AutoConfig

        self.model_config = AutoConfig.from_pretrained(self.model_path, local_files_only=True)
        try:
            self.tokenizer = load_tokenizer(self.model_path)
        except Exception as e:
            raise ConfigError(f"model.name_or_path={cfg.model.name_or_path!r}: no usable tokenizer in "
                              f"{self.model_path} ({e}); the checkpoint needs its tokenizer files") from None
        self.max_tokens = int(getattr(self.model_config, "max_position_embeddings", 0) or sys.maxsize)
        self.eos = eos_ids(self.tokenizer, self.model_config)
        from apb.methods import build_method

        self.method = build_method(cfg.method.name, cfg.method)  # validates method options now, not in a worker
        try:
            self.method.check(self.model_config, cfg.parallel.world_size)
        except ValueError as e:
            raise ConfigError(f"method.name={cfg.method.name!r}: {e}") from None
        self._group = group
        self._owns_group = group is None

    @classmethod
    def from_config(cls, source: str | Path | dict | None = None, overrides: dict | None = None,
                    **shortcuts: Any) -> "Engine":
        """Load and validate a config (path, dict or defaults); ``method="apb"``, ``world_size=2``,
        ``launcher=...``, ``model=...`` are shortcuts; ``overrides`` takes dotted keys."""
        unknown = set(shortcuts) - set(_SHORTCUTS)
        if unknown:
            raise ConfigError(f"unknown Engine.from_config argument(s) {sorted(unknown)}; shortcuts: "
                              f"{', '.join(_SHORTCUTS)}, or overrides={{'section.key': value}}")
        dotted = {_SHORTCUTS[k]: v for k, v in shortcuts.items()} | dict(overrides or {})
        return cls(load_config(source, dotted))

    # -- worker group -------------------------------------------------------------------------
    @property
    def group(self):
        if self._group is None:
            self._group = start_group(self.cfg)
        return self._group

    def _drop_group(self) -> None:
        if self._group is not None and self._owns_group:
            self._group.close(force=True)
            self._group = None

    def close(self) -> None:
        if self._group is not None and self._owns_group:
            self._group.close()
        self._group = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- documents ----------------------------------------------------------------------------
    def process(self, docs: Iterable[Any]) -> Iterator[dict]:
        """One result record per input, in input order."""
        for i, doc in enumerate(docs):
            yield self.process_one(doc, index=i)

    def process_one(self, doc: Any, index: int = 0) -> dict:
        doc_id = doc.get("id") if isinstance(doc, dict) and isinstance(doc.get("id"), str) else f"#{index}"
        try:
            ids, n_query, max_new = self._prepare(doc)
        except DocumentError as e:
            return self._record(doc_id, error=str(e))
        from apb.parallel.groups import WorkerError
        from apb.runtime.worker import PromptRequest

        d = self.cfg.decode
        req = PromptRequest(str(self.model_path), ids, self.cfg.method.name,
                            method_options=self.cfg.method.model_dump(exclude={"name"}), n_query=n_query,
                            dtype=self.cfg.model.dtype, decode_mode=d.mode, eos_ids=self.eos,
                            sampling=Sampling(max_new_tokens=max_new, temperature=d.temperature, top_p=d.top_p,
                                              seed=d.seed))
        group = self.group  # a group that cannot start is not one document's failure: it propagates
        try:
            result = group.call("run_prompt", req)[0]
        except WorkerError as e:
            if not self._owns_group:
                raise  # a group we did not start (torchrun) cannot be rebuilt
            self._drop_group()  # the next document starts a fresh group
            return self._record(doc_id, prompt_tokens=int(ids.numel()), error=f"worker failure: {e}")
        tokens = [t for t in result.tokens if t not in self.eos]
        answer = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return self._record(doc_id, answer=answer, prompt_tokens=int(ids.numel()), prefill_s=result.prefill_s,
                            decode_s=result.decode_s)

    def _record(self, doc_id, answer=None, prompt_tokens=0, prefill_s=0.0, decode_s=0.0, error=None) -> dict:
        return {"id": doc_id, "answer": answer, "method": self.method.label, "world_size": self.cfg.parallel.world_size,
                "prompt_tokens": prompt_tokens, "prefill_s": round(prefill_s, 6), "decode_s": round(decode_s, 6),
                "error": error}

    def _prepare(self, doc: Any):
        import torch

        if not isinstance(doc, dict):
            raise DocumentError(f"a record must be a JSON object with id, context, question; got {type(doc).__name__}")
        for key in ("id", "context", "question"):
            if key not in doc:
                raise DocumentError(f"missing field {key!r}; a record needs id, context, question "
                                    "(and optionally max_new_tokens)")
            if not isinstance(doc[key], str):
                raise DocumentError(f"field {key!r} must be a string, got {type(doc[key]).__name__}")
        extra = set(doc) - {"id", "context", "question", "max_new_tokens", "answer"}
        if extra:
            raise DocumentError(f"unknown field(s) {sorted(extra)}; valid: id, context, question, max_new_tokens "
                                "(and answer, which is ignored)")
        if not doc["id"]:
            raise DocumentError("field 'id' is empty")
        if not doc["context"].strip():
            raise DocumentError("field 'context' is empty: there is nothing to prefill")
        max_new = doc.get("max_new_tokens", self.cfg.decode.max_new_tokens)
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
            raise DocumentError(f"field 'max_new_tokens' must be a positive integer, got {max_new!r}")
        ctx, query = encode_document(self.tokenizer, doc["context"], doc["question"])
        total = len(ctx) + len(query)
        if total + max_new > self.max_tokens:
            raise DocumentError(f"prompt of {total} tokens + {max_new} new tokens exceeds the model's limit of "
                                f"{self.max_tokens} (max_position_embeddings); shorten the context")
        if self.method.query_phase and not query:
            raise DocumentError("the question encodes to no tokens")
        n_query = len(query) if len(ctx) > 0 else 0
        return torch.tensor(ctx + query, dtype=torch.long), n_query, max_new

    # -- files --------------------------------------------------------------------------------
    def process_file(self, in_path: str | Path, out_path: str | Path, progress: bool = True) -> Summary:
        """Answer every record of a JSONL file into another, resumably.

        Each result is written and flushed as it finishes. Re-running with the same output
        keeps the answered records, retries the failed ones, and refuses a different config.
        """
        in_path, out_path = Path(in_path), Path(out_path)
        if not in_path.is_file():
            raise FileNotFoundError(f"input file {str(in_path)!r} does not exist")
        done = self._resume(out_path)
        records = list(_read_jsonl(in_path))
        summary = Summary()
        bar = _progress(len(records), progress)
        with out_path.open("a", encoding="utf-8") as out:
            for i, (line_no, doc) in enumerate(records):
                key = doc.get("id") if isinstance(doc, dict) else None
                if isinstance(key, str) and key in done:
                    summary.skipped += 1
                    bar.update(1)
                    continue
                if isinstance(doc, DocumentError):
                    rec = self._record(f"line-{line_no}", error=str(doc))
                else:
                    rec = self.process_one(doc, index=i)
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                out.flush()
                os.fsync(out.fileno())
                summary.documents += 1
                summary.errors += rec["error"] is not None
                summary.prefill_s += rec["prefill_s"]
                summary.decode_s += rec["decode_s"]
                summary.prompt_tokens += rec["prompt_tokens"]
                bar.update(1)
                if summary.prefill_s > 0:
                    bar.set_postfix(tok_s=f"{summary.prompt_tokens / summary.prefill_s:.0f}", errors=summary.errors)
        bar.close()
        return summary

    def _resume(self, out_path: Path) -> set[str]:
        """Ids already answered in ``out_path``; failed records are dropped so they are retried."""
        sidecar = Path(f"{out_path}.config.yaml")
        if out_path.exists() and sidecar.exists():
            before = yaml.safe_load(sidecar.read_text())
            now = Config.model_validate(before).fingerprint() if before else None
            if now != self.cfg.fingerprint():
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
        dump_config(self.cfg, sidecar)
        return set(done)


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
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


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="doc", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def start_group(cfg: Config, world_size: int | None = None, launcher: str | None = None, timeout_s: float | None = None,
                **worker_kwargs):
    """Start the worker group the config asks for (local processes or Ray actors); the arguments
    override the config's world size, launcher and timeout, ``worker_kwargs`` the worker's options."""
    from apb.parallel.groups import start_group as start

    timeout_s = timeout_s or cfg.parallel.timeout_s
    kwargs = {"device": cfg.parallel.device, "timeout_s": timeout_s} | worker_kwargs
    try:
        return start(launcher or cfg.parallel.launcher, world_size or cfg.parallel.world_size, kwargs, timeout_s,
                     ray_config=cfg.ray)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def summary_line(summary: Summary) -> str:
    rate = summary.prompt_tokens / summary.prefill_s if summary.prefill_s > 0 else math.nan
    return f"{summary}; {rate:.0f} prompt tokens/s"

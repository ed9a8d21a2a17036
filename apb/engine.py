"""The Python API for documents in, results out: :class:`Engine`.

::

    with apb.Engine.from_config("configs/tiny-cpu.yaml", method="apb") as engine:
        for result in engine.process([{"id": "a", "context": "...", "question": "..."}]):
            print(result["answer"])
        engine.process_file("in.jsonl", "out.jsonl")

The engine checks and tokenises each document on the driver (:func:`check_document`,
:func:`encode_prompt`), sends the prompt to a worker group (local processes, Ray actors, or the
processes torchrun started) and turns the decoded tokens back into text, one record of
:data:`RESULT_KEYS` per document, followed by the input record's own extra fields.

Failures become error records and the batch goes on. Each says its ``error_kind``: ``final``
when the document itself is at fault (a bad field, a prompt too long for the model or too short
for the method's layout on W hosts: all checked on the driver, so no worker sees it), or
``transient`` when the workers failed (one died, timed out or ran out of memory): the document
is then tried again on a fresh group up to ``parallel.max_retries`` times before its record is
written. JSONL files (reading, resume, progress) are :mod:`apb.batch`'s job.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from transformers import AutoConfig

from apb import batch
from apb.batch import FINAL, TRANSIENT, DocumentError, Summary, record_id
from apb.config import Config, ConfigError, load_config
from apb.methods import build_method
from apb.model.catalog import resolve_model
from apb.model.features import check_supported
from apb.model.loading import check_attention_interface
from apb.model.text import encode_document, eos_ids, load_tokenizer
from apb.parallel import groups
from apb.runtime import memory
from apb.runtime.decode import Sampling
from apb.runtime.worker import PromptRequest


RESULT_KEYS = ("id", "answer", "method", "world_size", "prompt_tokens", "prefill_s", "decode_s", "lead", "error",
               "error_kind")
DOCUMENT_FIELDS = ("id", "context", "question")
#: the fields an input record may carry that are not copied into its result: ``answer`` (the
#: reference of an eval data set) is accepted and ignored, although it names a result key
INPUT_FIELDS = (*DOCUMENT_FIELDS, "max_new_tokens", "answer")
_SHORTCUTS = {"method": "method.name", "world_size": "parallel.world_size", "launcher": "parallel.launcher",
              "model": "model.name_or_path", "dtype": "model.dtype", "max_new_tokens": "decode.max_new_tokens",
              "decode_mode": "decode.mode"}


# -- documents ----------------------------------------------------------------------------------
def check_document(doc: Any, default_max_new_tokens: int) -> int:
    """Check one input record's fields and return its ``max_new_tokens``; :class:`DocumentError` says
    which field is wrong.

    Fields beyond :data:`INPUT_FIELDS` (metadata such as ``source`` or ``depth``) are allowed and
    copied into the result (:func:`extra_fields`), unless one is named like a result key, which
    would overwrite it: that is an error. ``answer`` is the exception: a reference answer is
    accepted and ignored, as eval data sets carry one.
    """
    if not isinstance(doc, dict):
        raise DocumentError(f"a record must be a JSON object with id, context, question; got {type(doc).__name__}")
    for key in DOCUMENT_FIELDS:
        if key not in doc:
            raise DocumentError(f"missing field {key!r}; a record needs id, context, question "
                                "(and optionally max_new_tokens)")
        if not isinstance(doc[key], str):
            raise DocumentError(f"field {key!r} must be a string, got {type(doc[key]).__name__}")
    clash = [k for k in doc if k not in INPUT_FIELDS and k in RESULT_KEYS]
    if clash:
        raise DocumentError(f"field(s) {clash} would overwrite the result key(s) of that name: extra fields are "
                            f"copied into the result, whose keys are {', '.join(RESULT_KEYS)}; rename the field(s)")
    if not doc["id"]:
        raise DocumentError("field 'id' is empty")
    if not doc["context"].strip():
        raise DocumentError("field 'context' is empty: there is nothing to prefill")
    max_new = doc.get("max_new_tokens", default_max_new_tokens)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise DocumentError(f"field 'max_new_tokens' must be a positive integer, got {max_new!r}")
    return max_new


def extra_fields(doc: Any) -> dict:
    """The fields of an input record copied unchanged into its result: all but :data:`INPUT_FIELDS`.
    Empty when they cannot be (not an object, or a field named like a result key)."""
    if not isinstance(doc, dict):
        return {}
    extra = {k: v for k, v in doc.items() if k not in INPUT_FIELDS}
    return {} if set(extra) & set(RESULT_KEYS) else extra


def encode_prompt(tokenizer, doc: dict, max_new: int, max_tokens: int, needs_query: bool) -> tuple[torch.Tensor, int]:
    """A checked document's prompt ids and how many of them, at the end, are the query.

    :class:`DocumentError` when the prompt plus ``max_new`` tokens passes ``max_tokens``, or when
    the method has a query phase (``needs_query``) and the question encodes to nothing.
    """
    ctx, query = encode_document(tokenizer, doc["context"], doc["question"])
    total = len(ctx) + len(query)
    if total + max_new > max_tokens:
        raise DocumentError(f"prompt of {total} tokens + {max_new} new tokens exceeds the model's limit of "
                            f"{max_tokens} (max_position_embeddings); shorten the context")
    if needs_query and not query:
        raise DocumentError("the question encodes to no tokens")
    n_query = len(query) if len(ctx) > 0 else 0
    return torch.tensor(ctx + query, dtype=torch.long), n_query


# -- engine -------------------------------------------------------------------------------------
class Engine:
    def __init__(self, cfg: Config, group=None):
        self.cfg = cfg
        self.model_path = resolve_model(cfg.model.name_or_path, cfg.model.seed)
        self.model_config = AutoConfig.from_pretrained(self.model_path, local_files_only=True)
        try:
            self.tokenizer = load_tokenizer(self.model_path)
        except Exception as e:
            raise ConfigError(f"model.name_or_path={cfg.model.name_or_path!r}: no usable tokenizer in "
                              f"{self.model_path} ({e}); the checkpoint needs its tokenizer files") from None
        self.max_tokens = int(getattr(self.model_config, "max_position_embeddings", 0) or sys.maxsize)
        self.eos = eos_ids(self.tokenizer, self.model_config)
        try:  # a layer kind the runtime cannot run exactly is refused here, before any worker starts
            check_supported(self.model_config)
            structure = check_attention_interface(self.model_config)
        except ValueError as e:
            raise ConfigError(f"model.name_or_path={cfg.model.name_or_path!r}: {e}") from None
        self.method = build_method(cfg.method.name, cfg.method)  # validates method options now, not in a worker
        try:
            self.method.check(self.model_config, cfg.parallel.world_size)
            # a compressor that reads the projections before RoPE checks the model's modules, on
            # the skeleton the attention check built (one per start)
            if structure is not None and self.method.capture_pre_rope():
                self.method.check_structure(structure)
        except ValueError as e:
            raise ConfigError(f"method.name={cfg.method.name!r}: {e}") from None
        self._group = group
        self._owns_group = group is None
        self._checked = None  # the group whose workers have checked the model (_check_model)
        p = cfg.parallel
        self.memory_budget = memory.device_budget(p.device, p.world_size, p.launcher, p.memory_gb, p.share_gpus)
        self._n_params: int | None = None

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

    def _check_model(self, group) -> None:
        """The workers load the model and refuse it where no document could run (its one-token
        probe, apb's rotary): once per group, before its first document. A refusal stops the run
        with its reason (``ConfigError``), as a bad config does, instead of failing every document;
        any other failure is the caller's to retry."""
        if self._checked is group:
            return
        try:
            group.call("check_model", str(self.model_path), self.cfg.model.dtype, self.cfg.method.name,
                       self.cfg.method.model_dump(exclude={"name"}))
        except groups.WorkerError as e:
            if not e.refused:
                raise
            self._drop_group()  # the failed call closed it
            raise ConfigError(f"model.name_or_path={self.cfg.model.name_or_path!r} with method.name="
                              f"{self.cfg.method.name!r}, refused by the workers before any document: "
                              f"{e.reason}") from None
        self._checked = group

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

    def process_one(self, doc: Any, index: int = 0, fallback_id: str | None = None) -> dict:
        """One result record; a document without a usable id is named ``fallback_id`` (default ``#index``)."""
        doc_id = record_id(doc, fallback_id or f"#{index}")
        extra = extra_fields(doc)
        try:
            max_new = check_document(doc, self.cfg.decode.max_new_tokens)
            ids, n_query = encode_prompt(self.tokenizer, doc, max_new, self.max_tokens, self.method.query_phase)
            self.check_sizes(int(ids.numel()), n_query)
            self.check_memory(int(ids.numel()), n_query, max_new)
        except DocumentError as e:
            return self.record(doc_id, error=str(e), extra=extra)
        request, tries = self._request(ids, n_query, max_new), self.cfg.parallel.max_retries + 1
        for _ in range(tries):
            group = self.group  # a group that cannot start is not one document's failure: it propagates
            try:
                self._check_model(group)
                result = group.call("run_prompt", request)[0]
                break
            except groups.WorkerError as e:
                if not self._owns_group:
                    raise  # a group we did not start (torchrun) cannot be rebuilt
                self._drop_group()  # the next try, or the next document, starts a fresh group
                failure = e
                if e.refused:  # it would be refused again on any group: final, not retried
                    return self.record(doc_id, prompt_tokens=int(ids.numel()),
                                       error=f"refused by a worker: {e.reason}", extra=extra)
        else:
            times = "once" if tries == 1 else f"{tries} times, each on a fresh worker group"
            return self.record(doc_id, prompt_tokens=int(ids.numel()), error=f"worker failure (tried {times}): "
                               f"{failure}", transient=True, extra=extra)
        tokens = [t for t in result.tokens if t not in self.eos]
        answer = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return self.record(doc_id, answer=answer, prompt_tokens=int(ids.numel()), prefill_s=result.prefill_s,
                           decode_s=result.decode_s, lead=min(result.leads) if result.leads else None, extra=extra)

    def estimate_one(self, doc: Any, fallback_id: str) -> dict:
        """What :meth:`process_one` would check, without running: the document's id, prompt tokens,
        each host's estimated memory (:class:`~apb.runtime.memory.HostMemory` as dicts) and the
        error it would be refused with (None if it would run)."""
        out = {"id": record_id(doc, fallback_id), "prompt_tokens": 0, "hosts": [], "error": None}
        try:
            if isinstance(doc, DocumentError):
                raise doc
            max_new = check_document(doc, self.cfg.decode.max_new_tokens)
            ids, n_query = encode_prompt(self.tokenizer, doc, max_new, self.max_tokens, self.method.query_phase)
            out["prompt_tokens"] = int(ids.numel())
            self.check_sizes(int(ids.numel()), n_query)
            out["hosts"] = [h.as_dict() for h in self.memory_estimate(int(ids.numel()), n_query, max_new)]
            self.check_memory(int(ids.numel()), n_query, max_new)
        except DocumentError as e:
            out["error"] = str(e)
        return out

    def check_sizes(self, n_tokens: int, n_query: int) -> None:
        """:class:`DocumentError` when the method cannot lay this prompt out over the configured W
        hosts (:meth:`~apb.methods.base.Method.check_sizes`): refused here, not in a worker."""
        try:
            self.method.check_sizes(n_tokens, n_query, self.cfg.parallel.world_size)
        except ValueError as e:
            raise DocumentError(str(e)) from None

    def memory_estimate(self, n_tokens: int, n_query: int, max_new: int) -> list[memory.HostMemory]:
        """Per host, the estimated memory of one prompt (:func:`apb.runtime.memory.estimate`)."""
        if self._n_params is None:
            self._n_params = memory.parameter_count(self.model_path)
        return memory.estimate(self.method, self.model_config, self._n_params, n_tokens, n_query,
                               self.cfg.parallel.world_size, self.cfg.model.dtype, self.cfg.decode.mode, max_new)

    def check_memory(self, n_tokens: int, n_query: int, max_new: int) -> None:
        """:class:`DocumentError` (final) when a host's estimate exceeds :attr:`memory_budget`."""
        if self.memory_budget is None:
            return
        hosts = self.memory_estimate(n_tokens, n_query, max_new)
        if max(h.total for h in hosts) > self.memory_budget:
            raise DocumentError(f"estimated memory too large: a prompt of {n_tokens} tokens at W="
                                f"{self.cfg.parallel.world_size}: {memory.describe(hosts)}, over the "
                                f"{self.memory_budget / memory.GIB:.2f} GiB a host may use (parallel.memory_gb); "
                                "use more hosts, decode.mode: distributed, a 16-bit model.dtype or a shorter document")

    def _request(self, ids: torch.Tensor, n_query: int, max_new: int) -> PromptRequest:
        d = self.cfg.decode
        return PromptRequest(str(self.model_path), ids, self.cfg.method.name,
                             method_options=self.cfg.method.model_dump(exclude={"name"}), n_query=n_query,
                             dtype=self.cfg.model.dtype, decode_mode=d.mode, eos_ids=self.eos,
                             sampling=Sampling(max_new_tokens=max_new, temperature=d.temperature, top_p=d.top_p,
                                               seed=d.seed))

    def record(self, doc_id: str, answer=None, prompt_tokens=0, prefill_s=0.0, decode_s=0.0, lead=None, error=None,
               transient: bool = False, extra: dict | None = None) -> dict:
        """One result record, keys in :data:`RESULT_KEYS` order, then ``extra`` (the input's own fields).

        ``lead``: the answer's weakest token, as its log-probability's lead over the most likely
        other token (``decode.token_lead``): near 0, a near tie that any change to the cache can flip.

        An error is ``final`` (the document is at fault: resume keeps it) unless ``transient``
        (the workers failed: resume tries it again).
        """
        kind = None if error is None else TRANSIENT if transient else FINAL
        return {"id": doc_id, "answer": answer, "method": self.method.label, "world_size": self.cfg.parallel.world_size,
                "prompt_tokens": prompt_tokens, "prefill_s": round(prefill_s, 6), "decode_s": round(decode_s, 6),
                "lead": None if lead is None else round(lead, 4), "error": error, "error_kind": kind} | (extra or {})

    def process_file(self, in_path: str | Path, out_path: str | Path, progress: bool = True,
                     retry_errors: bool = False) -> "Summary":
        """Answer every record of a JSONL file into another, resumably (:func:`apb.batch.process_file`)."""

        return batch.process_file(self, in_path, out_path, progress, retry_errors)


def available_cores() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def local_threads(world_size: int) -> int:
    """Threads per local worker: the cores this process may use, split evenly (W processes each at
    torch's default would run W x cores threads on the cores)."""
    return max(1, available_cores() // world_size)


def start_group(cfg: Config, world_size: int | None = None, launcher: str | None = None, timeout_s: float | None = None,
                **worker_kwargs):
    """Start the worker group the config asks for (local processes or Ray actors); the arguments
    override the config's world size, launcher and timeout, ``worker_kwargs`` the worker's options."""
    timeout_s = timeout_s or cfg.parallel.timeout_s
    launcher = launcher or cfg.parallel.launcher
    world_size = world_size or cfg.parallel.world_size
    if cfg.parallel.share_gpus and launcher == "ray":
        raise ConfigError("parallel.share_gpus works with the local and torchrun launchers; Ray gives each worker "
                          "its own GPU: set parallel.launcher: local, or parallel.share_gpus: false")
    kwargs = {"device": cfg.parallel.device, "timeout_s": timeout_s, "share_gpus": cfg.parallel.share_gpus,
              "threads": cfg.parallel.threads or (local_threads(world_size) if launcher == "local" else None),
              # local workers share this machine: while the decode host decodes a gathered cache
              # alone, the others wait, and it may use their cores too
              "decode_threads": available_cores() if launcher == "local" and not cfg.parallel.threads else None,
              "retain_freed_memory": cfg.parallel.retain_freed_memory}
    try:
        return groups.start_group(launcher, world_size, kwargs | worker_kwargs, timeout_s, ray_config=cfg.ray)
    except ValueError as e:
        raise ConfigError(str(e)) from None

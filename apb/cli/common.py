"""What every ``apb`` subcommand shares: config options, comma lists, outputs, and the error policy.

Error policy (:func:`report_errors`): a mistake the user can fix (a config, a document, a
command-line argument, a file they named that is missing) is one line ``apb: <message>`` and
exit status 2; a worker failure is one line and status 1; anything else is a bug and keeps its
traceback (status 1). The CLI's own argument checks raise :class:`UsageError`.

apb.config, apb.engine and apb.methods import torch, so they are imported inside the functions
that need them: building the parser (``apb --help``) imports this module and must stay fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence


class UsageError(ValueError):
    """A command-line argument the user must fix; reported as one line, exit status 2."""


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: the built-in tiny CPU config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set parallel.timeout_s=60 (repeatable)")


def config_from(args: argparse.Namespace, extra: Sequence[str] = ()):
    """The config from ``--config`` and ``--set``, then ``extra`` overrides (the subcommand's own options)."""
    # imported on use: `apb --help` builds every subcommand's parser and must not load torch
    from apb.config import load_config

    return load_config(args.config, [*args.overrides, *extra])


def model_override(args: argparse.Namespace, default: str) -> list[str]:
    """The override naming the model a subcommand runs: ``--model``; else none, when a ``--config``
    file or a ``--set model.name_or_path=...`` names one (the user's choice stands); else the
    subcommand's own default (``apb bench``'s attention-bound preset, ``apb eval``'s trained model).

    A subcommand default that overrode the model a config file names would run another model than
    the one asked for, silently.
    """
    if args.model:
        return [f"model.name_or_path={args.model}"]
    if any(o.partition("=")[0].strip() == "model.name_or_path" for o in args.overrides):
        return []
    if args.config:
        import yaml  # light, but only needed here

        try:
            raw = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError):
            raw = {}  # load_config reports the file's own problem, with its name
        if isinstance(raw, dict) and isinstance(raw.get("model"), dict) and "name_or_path" in raw["model"]:
            return []
    return [f"model.name_or_path={default}"]


def csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def positive_ints(text: str) -> list[int]:
    """argparse type for lengths and sizes: comma-separated integers >= 1."""
    try:
        values = [int(t) for t in csv(text)]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def check_methods(names: list[str]) -> None:
    """Reject an unknown method name (or variant) before any work starts."""
    # imported on use: `apb --help` builds every subcommand's parser and must not load torch
    from apb.methods import check_method_name

    for name in names:
        try:
            check_method_name(name)
        except ValueError as e:
            raise UsageError(f"--methods: {e}") from None


def write_json(path: str, payload: Any, cfg=None) -> None:
    """Write ``payload`` as JSON at ``path``, then :func:`config_beside`."""
    Path(path).write_text(json.dumps(payload, indent=2))
    config_beside(path, cfg)


def config_beside(path: str, cfg=None) -> None:
    """Write the resolved config beside an output just written (PATH.config.yaml), and say so."""
    if cfg is None:
        print(f"wrote {path}")
        return
    # imported on use: `apb --help` builds every subcommand's parser and must not load torch
    from apb.config import dump_config

    dump_config(cfg, f"{path}.config.yaml")
    print(f"wrote {path} (resolved config: {path}.config.yaml)")


def report_errors(fn: Callable[..., int], *args: Any) -> int:
    """``fn(*args)`` under the error policy (module docstring): returns its status, or 2/1 for a
    user error/worker failure after one line on stderr; any other exception propagates."""
    try:
        return fn(*args)
    except Exception as e:
        reported = _classify(e)
        if reported is None:
            raise
        status, message = reported
        print(f"apb: {message}", file=sys.stderr)
        return status


def _classify(e: Exception) -> tuple[int, str] | None:
    # imported on use: `apb --help` builds every subcommand's parser and must not load torch
    from apb.config import ConfigError
    from apb.engine import DocumentError
    from apb.model.catalog import FetchError
    from apb.model.gguf import MissingExtraError
    from apb.parallel.groups import WorkerError

    if isinstance(e, (UsageError, ConfigError, DocumentError, FileNotFoundError, MissingExtraError)):
        return 2, str(e)
    if isinstance(e, FetchError):  # the registry or the network, not the user's input: status 1, no traceback
        return 1, str(e)
    if isinstance(e, WorkerError):
        return 1, f"a worker failed, the run was stopped: {e}"
    return None

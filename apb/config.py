"""Typed, validated configuration: YAML in, one frozen object out, errors that name the fix.

A config file has one section per concern (``model``, ``parallel``, ``method``, ``decode``).
Unknown keys are rejected with the list of valid ones; a wrong value names the field, the value
and what is allowed. Command-line overrides use dotted keys (``--set method.name=ring``) and go
through the same validation. :func:`dump_config` writes the resolved config beside outputs.
Method and compressor names are checked against the registries in :mod:`apb.methods`, which in
turn never import this module: :func:`apb.methods.build_method` is handed a :class:`MethodConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from apb.methods import check_method_name
from apb.methods.compressors import compressor_names


class ConfigError(ValueError):
    """A config that cannot be used; the message says which field and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelConfig(_Section):
    name_or_path: str = Field("tiny-llama", description="a preset (tiny-llama, tiny-qwen2, tiny-mistral) or a "
                                                       "local Hugging Face checkpoint directory")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and activations; auto: float32 for the presets and packaged models, bfloat16 "
                            "for a real checkpoint where this machine computes it natively (a CUDA device with "
                            "bfloat16, a CPU with AMX or AVX512-BF16), else float32. Decided when the config is "
                            "loaded, so results and the config written beside them name the dtype used")
    seed: int = Field(0, description="seed for a preset's random weights")


class ParallelConfig(_Section):
    world_size: int = Field(2, ge=1, description="hosts in the sequence-parallel group (W)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else CPU")
    share_gpus: bool = Field(
        False, description="let more processes on a node than it has GPUs share them (local rank r on GPU r mod "
                            "count). NCCL refuses two ranks on one GPU, so when set the group always runs over gloo "
                            "with every message copied through host memory: for checking the methods on a one-GPU "
                            "machine "
                            "(make gpu-check), not for speed; ulysses (DeepSpeed's all-to-all) needs NCCL and is "
                            "refused. Local and torchrun launchers only (Ray gives each worker its own GPU)")
    timeout_s: float = Field(300.0, gt=0, description="limit on every collective and every wait on a worker")
    launcher: Literal["local", "ray", "torchrun"] = Field(
        "local", description="local: worker processes on this machine; ray: one actor per GPU (or CPU slot) in a "
                             "placement group; torchrun: the processes torchrun started")
    threads: Optional[int] = Field(
        None, ge=1, description="CPU threads per worker process; unset: local workers split this machine's cores "
                                "between them (at least one each; the decode host uses them all while it decodes "
                                "a gathered cache alone), Ray and torchrun workers keep torch's default")
    retain_freed_memory: bool = Field(
        False, description="worker processes keep the memory a layer frees for the next layer instead of returning "
                           "it to the system (glibc's malloc; apb.runtime.allocator): page faults per prefill fell "
                           "10-50x and prefill 1-3% faster on CPU, for 2-7% more peak memory per host and resident "
                           "memory kept near that peak between documents; false: the C library's defaults. A worker whose C library is "
                           "not glibc refuses to start with it set")
    memory_gb: Optional[float] = Field(
        None, gt=0, description="memory one host may use, in GiB: documents whose estimate (apb.runtime.memory) "
                                "exceeds it are refused before they run; unset: the CUDA device's total memory, "
                                "or for local CPU workers this machine's available memory shared among them "
                                "(Ray/torchrun CPU hosts: no limit checked)")
    max_retries: int = Field(
        1, ge=0, description="times a document is tried again, on a freshly started worker group, after a "
                             "transient failure (a worker died, timed out or ran out of memory) before its error "
                             "record is written; 0: never. A group passed in (torchrun) is never rebuilt")


class RayConfig(_Section):
    address: Optional[str] = Field(None, description="None starts a local Ray instance; 'auto' joins a cluster")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how worker bundles spread over nodes (SPREAD for multi-node)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker actor")
    include_dashboard: bool = Field(False, description="start Ray's dashboard with a local instance")
    dashboard_host: str = Field("127.0.0.1", description="where the dashboard listens, if started")
    start_timeout_s: float = Field(120.0, gt=0, description="limit on placing and starting the worker actors")


SizeValue = Union[int, float, str, None]


class MethodConfig(_Section):
    name: str = Field("ring", description="attention method, optionally with a variant (apb:uncompressed)")
    anchor_len: Union[int, float, None] = Field(
        None, description="anchor tokens (int) or fraction of a block (float); default: the method's own "
                          "(apb: block/4, star: block, spava: n/64)")
    passing_len: Union[int, float, str, list[Union[int, float, Literal["all"], None]],
                       dict[str, list[Union[int, float]]], None] = Field(
        None, description="passing-block tokens per host: int, block fraction, 'all', a per-layer list (whose "
                          "entries may also be 'all' or null: the default), or {linear: [first, last]}; "
                          "default apb: block/8, spava: n/128")
    exact_layers: Union[StrictInt, list[StrictInt], None] = Field(
        None, description="star, apb, spava: layers whose blocks attend every earlier token exactly (balanced, by a "
                          "head-sharded exchange; no passing there): N for the first N layers, or a list of layer "
                          "indices; default none")
    query_insert_pos: int = Field(16, ge=0, description="apb: context tokens before the query in the anchor")
    compressor: str = Field("query", description="how passing blocks are chosen (query, snapkv, retaining_heads, "
                                                 "stride)")
    pool_width: int = Field(5, ge=1, description="max-pool width over token scores (odd; 1 disables)")
    snapkv_window: int = Field(16, ge=1, description="snapkv: query tokens whose attention scores the block")
    retaining_heads_path: Optional[str] = Field(None, description="retaining_heads: safetensors weights file")
    query_positions: Literal["true", "anchor"] = Field(
        "true", description="apb: positions at which the anchor's copy of the query scores block keys: 'true' (as "
                            "the real query at the end of the prompt) or 'anchor' (its copy's own positions, the "
                            "behaviour before the fix, kept for comparison)")
    round_to: int = Field(1, ge=1, description="round anchor/passing sizes to a multiple of this (spava: 128)")
    share_anchor: Optional[Union[bool, Literal["split"]]] = Field(
        None, description="compute the anchor once instead of on every host; unset: the method's default (apb, "
                          "spava: on; star: off). star, apb: one host computes it and sends its K/V (and apb's "
                          "query vectors) to the other anchored hosts each layer (star: host 0's own block start; "
                          "apb: host 1), one broadcast per layer; spava: each host computes the 1/W share of the "
                          "anchor it caches and the shares' K/V travel with the passing blocks. 'split' (apb, "
                          "spava): apb's hosts 0..W-2 each compute a share of the anchor (the query embedded), "
                          "whose K/V are all-gathered each layer; for spava the same as true. The same attention "
                          "up to rounding, less linear work")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        check_method_name(v)
        return v

    @field_validator("compressor")
    @classmethod
    def _known_compressor(cls, v: str) -> str:
        if v not in compressor_names():
            raise ValueError(f"unknown compressor {v!r}; valid compressors: {', '.join(compressor_names())}")
        return v

    @field_validator("pool_width")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"pool_width must be odd so the pool is centred on each token, got {v}")
        return v

    @field_validator("passing_len", "anchor_len")
    @classmethod
    def _size(cls, v, info):
        items = v.get("linear", []) if isinstance(v, dict) else v if isinstance(v, list) else [v]
        for item in items:
            if isinstance(item, str) and not (item == "all" and info.field_name == "passing_len"):
                raise ValueError(f"{item!r} is not a size; use tokens (int), a block fraction (float) or 'all'")
            if isinstance(item, float) and not 0 < item <= 1:
                raise ValueError(f"fraction {item} must be in (0, 1]; write tokens as an integer")
            if isinstance(item, int) and item < 0:
                raise ValueError(f"size {item} must be >= 0")
        if isinstance(v, dict) and set(v) != {"linear"}:
            raise ValueError("a schedule is written {linear: [first, last]}")
        return v

    @field_validator("exact_layers")
    @classmethod
    def _layers(cls, v):
        items = v if isinstance(v, list) else [] if v is None else [v]
        if any(isinstance(i, bool) or i < 0 for i in items):
            raise ValueError(f"exact_layers={v!r}: layer counts and indices are integers >= 0")
        if isinstance(v, list) and len(set(v)) != len(v):
            raise ValueError(f"exact_layers={v!r} names a layer twice")
        return v

    @field_validator("query_positions", mode="before")
    @classmethod
    def _yaml_true(cls, v):
        # YAML reads an unquoted `true` (a file, or --set method.query_positions=true) as a bool
        return "true" if v is True else v

    @model_validator(mode="after")
    def _weights(self):
        if self.compressor == "retaining_heads" and not self.retaining_heads_path:
            raise ValueError("compressor 'retaining_heads' needs retaining_heads_path (a .safetensors file)")
        return self


class DecodeConfig(_Section):
    mode: Literal["gather", "distributed"] = Field(
        "gather", description="gather: caches go to one host, which decodes; distributed: caches stay, every step "
                              "merges partial attentions by LSE")
    max_new_tokens: int = Field(32, ge=1, description="tokens generated after the prompt")
    temperature: float = Field(0.0, ge=0, description="0 is greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (with temperature > 0)")
    seed: int = Field(0, description="sampling seed")


class Config(_Section):
    model: ModelConfig = ModelConfig()
    parallel: ParallelConfig = ParallelConfig()
    method: MethodConfig = MethodConfig()
    decode: DecodeConfig = DecodeConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _concrete_dtype(self):
        if self.model.dtype == "auto":
            # imported here: the catalog imports transformers, which `apb --help` must not pay for
            from apb.model.catalog import default_dtype

            dtype = default_dtype(self.model.name_or_path, self.parallel.device)
            object.__setattr__(self, "model", self.model.model_copy(update={"dtype": dtype}))
        return self

    def fingerprint(self) -> dict:
        """The fields that decide the answers; a re-run on an output file must keep them."""
        return {"model": self.model.model_dump(), "method": self.method.model_dump(),
                "decode": self.decode.model_dump(), "world_size": self.parallel.world_size}


def load_config(source: str | Path | dict | None = None, overrides: dict[str, Any] | list[str] | None = None
                ) -> Config:
    """Load a YAML path (or a dict), apply dotted overrides, validate. Raises :class:`ConfigError`."""
    if source is None:
        data: dict = {}
        where = "defaults"
    elif isinstance(source, dict):
        data, where = _deep_copy(source), "dict"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; pass --config with a YAML file "
                              f"(e.g. configs/tiny-cpu.yaml)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        where = str(path)
    if not isinstance(data, dict):
        raise ConfigError(f"config {where} must be a mapping of sections, got {type(data).__name__}")
    # a section whose keys are all commented out reads as None: it means "defaults"
    data = {k: ({} if v is None else v) for k, v in data.items()}
    for key, value in _parse_overrides(overrides).items():
        _set_dotted(data, key, value)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e, where)) from None


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))


def _parse_overrides(overrides) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return _strip_keys(overrides)
    out = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. method.name=ring")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def _strip_keys(overrides: dict) -> dict:
    out = {}
    for key, value in overrides.items():
        out[key.strip()] = value
    return out


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def _deep_copy(d: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = Config
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _explain(err: ValidationError, where: str) -> str:
    lines = [f"invalid config ({where}):"]
    for e in err.errors():
        loc = tuple(e["loc"])
        name = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            valid = ", ".join(parent.model_fields) if parent else "?"
            lines.append(f"  {name}: unknown key {loc[-1]!r}; valid keys here: {valid}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {name} = {e.get('input')!r}: {msg}")
    return "\n".join(lines)

"""apb.config: YAML in, validated frozen Config out; errors that name the field and the fix."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from apb.config import Config, ConfigError, MethodConfig, dump_config, load_config
from apb.model.catalog import default_dtype
from apb.methods import build_method, method_names

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.yaml")) + sorted(CONFIG_DIR.glob("*.yml"))

SECTIONS = ["model", "parallel", "method", "decode"]


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _line_with(msg: str, needle: str) -> str:
    lines = [ln for ln in msg.splitlines() if needle in ln]
    assert lines, f"no line mentions {needle!r} in:\n{msg}"
    return lines[0]


# ----------------------------------------------------------------------------- shipped configs


def test_config_dir_has_yaml():
    assert CONFIG_FILES, f"no YAML config in {CONFIG_DIR}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    raw = yaml.safe_load(path.read_text()) or {}
    # every value written in the file is what the Config holds
    for section, values in raw.items():
        for key, value in (values or {}).items():
            if (section, key, value) == ("model", "dtype", "auto"):  # resolved when loaded
                value = default_dtype(cfg.model.name_or_path, cfg.parallel.device)
            assert getattr(getattr(cfg, section), key) == value, f"{path.name}: {section}.{key}"
    assert cfg.method.name in method_names()


def test_defaults_load():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.parallel.world_size >= 1


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(Exception):
        cfg.parallel.world_size = 7  # type: ignore[misc]
    assert cfg.parallel.world_size == Config().parallel.world_size


# ----------------------------------------------------------------------------- unknown keys


def test_typo_in_section_key(tmp_path):
    p = _write(tmp_path, "method:\n  nme: ring\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    line = _line_with(msg, "nme")
    assert "name" in line  # the valid key of the method section is listed
    assert str(p) in msg


def test_typo_in_parallel_key_lists_all_valid(tmp_path):
    p = _write(tmp_path, "parallel:\n  world_sise: 2\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    line = _line_with(str(ei.value), "world_sise")
    for key in ("world_size", "device", "timeout_s", "launcher"):
        assert key in line


def test_typo_top_level_section(tmp_path):
    p = _write(tmp_path, "modle:\n  name_or_path: tiny-llama\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    line = _line_with(str(ei.value), "modle")
    for section in SECTIONS:
        assert section in line


def test_typo_via_dict_source():
    with pytest.raises(ConfigError) as ei:
        load_config({"decode": {"max_new_token": 4}})
    line = _line_with(str(ei.value), "max_new_token")
    assert "max_new_tokens" in line and "temperature" in line


# ----------------------------------------------------------------------------- wrong values


@pytest.mark.parametrize("text,field,value,hint", [
    ("parallel:\n  world_size: 0\n", "world_size", "0", None),
    ("parallel:\n  world_size: -2\n", "world_size", "-2", None),
    ("model:\n  dtype: float64\n", "dtype", "float64", "bfloat16"),
    ("method:\n  name: foo\n", "method.name", "foo", "ring"),
    ("parallel:\n  device: tpu\n", "device", "tpu", "cuda"),
    ("decode:\n  top_p: 1.5\n", "top_p", "1.5", None),
    ("parallel:\n  timeout_s: 0\n", "timeout_s", "0", None),
], ids=["world0", "world-neg", "dtype", "method", "device", "top_p", "timeout"])
def test_wrong_value_names_field_and_value(tmp_path, text, field, value, hint):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    line = _line_with(str(ei.value), field)
    assert re.search(rf"(?<![\w.-]){re.escape(value)}(?![\w.])", line), line
    if hint:
        assert hint in line


def test_method_error_lists_valid_methods(tmp_path):
    p = _write(tmp_path, "method:\n  name: foo\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    for name in method_names():
        assert name in str(ei.value)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_file(tmp_path, text):
    with pytest.raises(ConfigError):
        load_config(_write(tmp_path, text))


def test_invalid_yaml(tmp_path):
    p = _write(tmp_path, "model: [unclosed\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(p) in str(ei.value)


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(_write(tmp_path, "")) == Config()


# ----------------------------------------------------------------------------- overrides


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_overrides_apply(path):
    base = load_config(path)
    cfg = load_config(path, ["parallel.world_size=3", "method.name=ulysses"])
    assert cfg.parallel.world_size == 3
    assert isinstance(cfg.parallel.world_size, int)
    assert cfg.method.name == "ulysses"
    # everything else is untouched
    assert cfg.model == base.model and cfg.decode == base.decode
    assert cfg.parallel.device == base.parallel.device
    assert cfg.parallel.timeout_s == base.parallel.timeout_s


def test_override_types_parsed_as_yaml():
    cfg = load_config(None, ["decode.temperature=0.5", "decode.max_new_tokens=7", "model.dtype=bfloat16"])
    assert cfg.decode.temperature == 0.5
    assert cfg.decode.max_new_tokens == 7
    assert cfg.model.dtype == "bfloat16"


def test_dict_overrides():
    cfg = load_config(None, {"parallel.world_size": 5, "method.name": "full"})
    assert cfg.parallel.world_size == 5 and cfg.method.name == "full"


def test_override_does_not_mutate_dict_source():
    src = {"parallel": {"world_size": 2}, "method": {"name": "ring"}}
    cfg = load_config(src, ["parallel.world_size=4"])
    assert cfg.parallel.world_size == 4
    assert src == {"parallel": {"world_size": 2}, "method": {"name": "ring"}}


@pytest.mark.parametrize("override,needle", [
    ("parallel.world_size=0", "world_size"),
    ("method.name=foo", "foo"),
    ("model.dtype=float64", "float64"),
    ("parallel.nope=1", "nope"),
    ("bogus.key=1", "bogus"),
])
def test_overrides_are_validated(override, needle):
    path = CONFIG_FILES[0] if CONFIG_FILES else None
    with pytest.raises(ConfigError) as ei:
        load_config(path, [override])
    assert needle in str(ei.value)


@pytest.mark.parametrize("bad", ["parallel.world_size", "=3", "", "parallel.world_size.x=3"])
def test_bad_override_string_raises(bad):
    path = CONFIG_FILES[0] if CONFIG_FILES else None
    with pytest.raises(ConfigError):
        load_config(path, [bad])


def test_bad_override_message_shows_form():
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["method.name"])
    msg = str(ei.value)
    assert "method.name" in msg and "=" in msg


# ----------------------------------------------------------------------------- missing file


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "sub" / "nope.yaml"
    with pytest.raises(ConfigError) as ei:
        load_config(missing)
    assert str(missing) in str(ei.value)


def test_directory_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path)
    assert str(tmp_path) in str(ei.value)


# ----------------------------------------------------------------------------- dump round-trip


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_dump_round_trip_shipped(tmp_path, path):
    cfg = load_config(path)
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    assert load_config(out) == cfg


@pytest.mark.parametrize("overrides", [
    [],
    ["parallel.world_size=4", "method.name=ulysses", "model.dtype=bfloat16", "parallel.timeout_s=12.5"],
    ["decode.temperature=0.7", "decode.top_p=0.9", "decode.seed=3", "model.seed=11", "parallel.device=cpu"],
])
def test_dump_round_trip_modified(tmp_path, overrides):
    cfg = load_config(None, overrides)
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    text = out.read_text()
    for section in SECTIONS:
        assert f"{section}:" in text
    back = load_config(out)
    assert back == cfg
    assert back.model_dump() == cfg.model_dump()
    # a real round trip: the overrides survive, not just the defaults
    if overrides:
        assert back != Config()


def test_build_method_validates_overrides_with_the_config_class():
    base = MethodConfig(compressor="stride", pool_width=3)
    m = build_method("apb:uncompressed", base, anchor_len=7)
    # the config's own fields stay, overrides join them, the variant's presets win over both
    assert (m.config.compressor, m.config.pool_width) == ("stride", 3)
    assert (m.config.name, m.config.anchor_len, m.config.passing_len) == ("apb", 0, "all")
    with pytest.raises(ValidationError, match="pool_width must be odd"):
        build_method("apb", base, pool_width=4)


def test_the_method_registry_does_not_import_the_config():
    # apb.config imports apb.methods to check names; the reverse would be a cycle
    code = "import sys, apb.methods; assert 'apb.config' not in sys.modules, sorted(sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_auto_dtype_is_bfloat16_for_real_checkpoints_where_the_machine_has_it(monkeypatch, tmp_path):
    from apb.model import catalog

    assert load_config(None).model.dtype == "float32"  # a preset
    assert load_config(None, ["model.name_or_path=apb-retrieval"]).model.dtype == "float32"
    real = ["model.name_or_path=smollm2-135m-instruct", "parallel.device=cpu"]
    monkeypatch.setattr(catalog, "bf16_native", lambda device="auto": True)
    assert load_config(None, real).model.dtype == "bfloat16"
    assert load_config(None, [f"model.name_or_path={tmp_path}", "parallel.device=cpu"]).model.dtype == "bfloat16"
    assert load_config(None, [*real, "model.dtype=float32"]).model.dtype == "float32"  # asked for: kept
    monkeypatch.setattr(catalog, "bf16_native", lambda device="auto": False)
    assert load_config(None, real).model.dtype == "float32"


def test_bf16_native_reads_the_cpu_flags(monkeypatch):
    from apb.model import catalog

    flags = {"amx": "flags\t: fpu sse2 amx_bf16 amx_tile\n", "avx512": "flags\t: fpu avx512_bf16\n",
             "none": "flags\t: fpu sse2 avx2\n"}
    for name, text in flags.items():
        monkeypatch.setattr(catalog.Path, "read_text", lambda self, text=text: text)
        assert catalog.bf16_native("cpu") == (name != "none"), name


def test_a_per_layer_passing_list_takes_whole_blocks_and_defaults():
    """Whole blocks in the first layers and the method's default after (docs/accuracy.md,
    section 6): 'all' is the block, null the default, as for a single value."""
    from apb.methods.sizes import resolve_passing

    cfg = MethodConfig(name="apb", passing_len=["all", None, 0.5])
    assert cfg.passing_len == ["all", None, 0.5]
    assert resolve_passing(cfg.passing_len, 100, 12.5, 1, 3) == [100, 12, 50]
    plan = build_method("apb", cfg).plan(1000 + 8, 4, 8, 3)
    assert plan.passing == (250, 31, 125)  # block 250: whole, block/8 (rounded), half
    with pytest.raises(ValidationError, match="(?s)passing_len.*Input should be 'all'"):
        MethodConfig(name="apb", passing_len=["most", 0.5])


# ----------------------------------------------------------------------------- exact layers


def test_exact_layers_resolve_per_model_and_drop_passing_there():
    from types import SimpleNamespace

    from apb.methods.sizes import resolve_exact_layers

    assert resolve_exact_layers(None, 30) == frozenset() and resolve_exact_layers(0, 30) == frozenset()
    assert resolve_exact_layers(3, 30) == {0, 1, 2} and resolve_exact_layers([29, 4], 30) == {4, 29}
    with pytest.raises(ValueError, match="exact_layers=31, but the model has 30 layers"):
        resolve_exact_layers(31, 30)
    with pytest.raises(ValueError, match=r"names layers \[30\], but the model's layers are 0..29"):
        resolve_exact_layers([0, 30], 30)
    for bad, why in [(-1, ">= 0"), ([1, 1], "twice"), (True, "integer"), ([2, True], "integer")]:
        with pytest.raises(ValidationError, match=why):
            MethodConfig(exact_layers=bad)
    plan = build_method("apb", MethodConfig(exact_layers=[1, 3], passing_len=0.5)).plan(1000, 4, 10, 4)
    assert plan.exact == {1, 3} and plan.passing == (124, 0, 124, 0)  # block 248, half of it
    # one host has nothing to be exact against
    assert build_method("apb", MethodConfig(exact_layers=2)).plan(1000, 1, 10, 4).exact == frozenset()
    # spava: nothing passed in the exact layers (anchor n/64 = 16, virtual block ceil(984/8) = 123)
    plan = build_method("spava", MethodConfig(exact_layers=[0], passing_len="all")).plan(1010, 4, 10, 2)
    assert plan.exact == {0} and plan.passing == (0, 123)
    model = SimpleNamespace(num_hidden_layers=4)
    build_method("spava", MethodConfig(exact_layers=2)).check(model, 4)
    with pytest.raises(ValueError, match="exact_layers=5, but the model has 4 layers"):
        build_method("star", MethodConfig(exact_layers=5)).check(model, 4)
    build_method("ring", MethodConfig(exact_layers=2)).check(model, 4)  # exact everywhere already


def test_share_anchor_is_refused_where_the_anchor_cannot_be_shared():
    from transformers import AutoConfig

    from apb.model.catalog import resolve_model

    from apb.methods.spava import Spava

    model_config = AutoConfig.from_pretrained(resolve_model("tiny-llama"))

    class Unshared(Spava):  # a method with an anchor it cannot share (none registered has one now)
        shares_anchor = False

    with pytest.raises(ValueError, match=r"method 'spava' computes its anchor on every host and cannot share it "
                                         r"\(method.share_anchor is for star, apb, spava\); unset method.share_anchor"):
        Unshared(MethodConfig(name="spava", share_anchor=True)).check(model_config, 4)
    Unshared(MethodConfig(name="spava")).check(model_config, 4)
    for name in ("star", "apb", "spava", "apb:shared", "star:shared", "spava:shared", "ring"):  # ring: no anchor
        build_method(name, MethodConfig(name=name, share_anchor=True)).check(model_config, 4)
    for name in ("apb:shared", "star:shared", "spava:shared"):
        assert build_method(name, MethodConfig(name=name)).config.share_anchor
    # unset, each method's own default: apb and spava share, star keeps its context phase silent
    defaults = {name: build_method(name, MethodConfig(name=name)).config.share_anchor
                for name in ("star", "apb", "spava", "apb:unshared", "spava:unshared", "ring")}
    assert defaults == {"star": False, "apb": "split", "spava": True, "apb:unshared": False, "spava:unshared": False,
                        "ring": False}, defaults


def test_a_split_anchor_is_for_apb_and_spava_and_named_where_refused():
    from transformers import AutoConfig

    from apb.config import ConfigError
    from apb.model.catalog import resolve_model

    model_config = AutoConfig.from_pretrained(resolve_model("tiny-llama"))
    cfg = load_config(None, ["method.name=apb", "method.share_anchor=split"])
    assert cfg.method.share_anchor == "split"
    assert build_method("apb:split", MethodConfig(name="apb:split")).config.share_anchor == "split"
    for name in ("apb", "spava", "ring"):  # spava's split is its shared anchor; ring has no anchor to split
        build_method(name, MethodConfig(name=name, share_anchor="split")).check(model_config, 4)
    with pytest.raises(ValueError, match=r"method 'star' cannot split its anchor over the hosts \(method.share_anchor: "
                                         r"split is for apb, spava\); set method.share_anchor to true or false"):
        build_method("star", MethodConfig(name="star", share_anchor="split")).check(model_config, 4)
    with pytest.raises(ConfigError, match="share_anchor"):
        load_config(None, ["method.share_anchor=halves"])


def test_usage_config_table_names_every_field_with_its_default():
    """docs/usage.md's config table: one row per field of every section, its default as the loader
    gives it (a field missing from the table, or a default changed in code alone, fails here)."""
    table = Path(__file__).resolve().parents[1] / "docs" / "usage.md"
    rows = {}
    for line in table.read_text().splitlines():
        m = re.match(r"\| `(\w+)\.(\w+)` \| ([^|]*) \|", line)
        if m:
            rows[(m.group(1), m.group(2))] = m.group(3).strip()
    sections = {section: field.annotation for section, field in Config.model_fields.items()}
    fields = {(section, name) for section, cls in sections.items() for name in cls.model_fields}
    assert fields - set(rows) == set(), "fields missing from docs/usage.md's config table"
    assert set(rows) - fields == set(), "rows in docs/usage.md's config table that name no field"
    for (section, name), cell in rows.items():
        value = sections[section].model_fields[name].default  # as declared (model.dtype: auto, resolved at load)
        if value is None and not cell.startswith("`"):
            continue  # an unset default described in words (share_anchor: each method's own)
        shown = "null" if value is None else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        # what a user copies from the cell must load as the default
        assert load_config(None, [f"{section}.{name}={cell.strip('`')}"]) == Config(), f"{section}.{name}: {cell}"
        assert cell in (f"`{shown}`", f"`{shown.strip(chr(39))}`"), \
            f"{section}.{name}: the table says {cell}, the code's default is {shown}"

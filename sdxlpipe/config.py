"""The TOML config: read, validate every key at once, resolve paths.

Each stage's `Params` dataclass is the schema of its `[stage]` table, so a
new param is one dataclass field with a commented default. Unknown keys are
errors; every problem is reported in one `ConfigError`. No model is loaded
and no torch is imported here.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Sequence

from sdxlpipe.errors import ConfigError, UserError
from sdxlpipe.stages import STAGES, load_stages, plain

DEFAULT_CONFIG = "sdxlpipe.toml"
# `.sdxlpipe/` beside the config: local to one checkout, never shared.
WORKSPACE_DIR = ".sdxlpipe"


@dataclass(frozen=True)
class Config:
    path: Path
    base_dir: Path
    model: str
    vae: str | None
    allow_pickle: bool
    device: str
    store_url: str
    workspace: Path
    params: dict[str, Any] = field(repr=False)
    # The stages this config runs, name -> module, in pipeline order (sdxlpipe/stages/__init__.py).
    stages: dict[str, ModuleType] = field(repr=False)
    # [dataset]: the name the encode stages publish this config's training-ready rows under, in the store.
    dataset_name: str = "dataset"
    publish: bool = True

    def to_record(self) -> dict[str, Any]:
        """The resolved config as plain JSON, for run records and checkpoints."""
        return {
            "model": self.model, "vae": self.vae, "device": self.device,
            "store": self.store_url, "dataset": {"name": self.dataset_name, "publish": self.publish},
            **{name: plain(p) for name, p in self.params.items()},
        }


# Top-level keys outside the stage tables. `sources` belongs to ingest.
_TOP = {"model", "vae", "allow_pickle", "device", "store", "dataset", "sources"}
# What a [dataset] name may be (cache_format/snapshots.py: a file name in every store, never a path).
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def load_config(path: str | Path, overrides: list[str] | None = None, stages: Sequence[str] = STAGES) -> Config:
    """The config at `path` with `--set` overrides, validated against the Params of `stages` (module names, in
    pipeline order: sdxlpipe's own unless a program runs another list)."""
    path = Path(path)
    modules = load_stages(stages)
    top = _TOP | set(modules)
    if not path.exists():
        raise UserError(
            f"config file not found: {path}",
            f"pass -c PATH, or run `sdxlpipe init DATASET_DIR` to write {DEFAULT_CONFIG}",
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML: {e}", "fix the syntax at the line named above") from e
    problems: list[tuple[str, str]] = []
    # dotted key -> the `--set` text that gave it, so its problems are blamed on --set, not the file.
    from_set: dict[str, str] = {}
    for item in overrides or []:
        before = len(problems)
        dotted = _apply_override(raw, item, problems)
        for key, _ in problems[before:]:  # `--set foo` without =, `--set model.x=1`
            from_set[key] = item
        if dotted:
            from_set[dotted] = item
    base = path.parent.absolute()

    for key in raw:
        if key not in top:
            problems.append((key, unknown_key(key, top)))

    model = raw.get("model", "tiny")
    if not isinstance(model, str) or not model:
        problems.append(("model", 'must be a string: "tiny", a diffusers directory, a Hub id or a .safetensors file'))
        model = "tiny"
    vae = raw.get("vae")
    if vae is not None and not isinstance(vae, str):
        problems.append(("vae", "must be a string (a diffusers directory, Hub id or .safetensors file)"))
        vae = None
    allow_pickle = raw.get("allow_pickle", False)
    if not isinstance(allow_pickle, bool):
        problems.append(("allow_pickle", "must be true or false"))
        allow_pickle = False
    # "cpu" by default: the tiny model and tests run anywhere; set "cuda" on a GPU machine.
    device = raw.get("device", "cpu")
    if device not in ("cpu", "cuda", "mps") and not str(device).startswith("cuda:"):
        problems.append(("device", f"must be cpu, cuda, cuda:N or mps, not {device!r}"))

    store_url = str(base / WORKSPACE_DIR / "store")
    store = raw.get("store", {})
    if not isinstance(store, dict):
        problems.append(("store", "must be a table: [store] url = ..."))
    else:
        for key in store:
            if key != "url":
                problems.append((f"store.{key}", unknown_key(key, ["url"])))
        if "url" in store:
            store_url = _resolve_url(str(store["url"]), base)

    dataset_name, publish = _dataset(raw.get("dataset", {}), base, problems)

    params: dict[str, Any] = {}
    for name, module in modules.items():
        table = raw.get(name, {})
        if name == "ingest" and "sources" in raw:
            table = {**table, "sources": raw["sources"]}
        if not isinstance(table, dict):
            problems.append((name, f"must be a table: [{name}]"))
            table = {}
        params[name] = _build(module.Params, table, name, base, problems)
        if params[name] is not None and hasattr(module, "check"):
            problems.extend(module.check(params[name]))

    if problems:
        raise ConfigError(str(path), problems, {key: _set_item(key, from_set) for key, _ in problems})
    return Config(
        path=path.absolute(), base_dir=base, model=_resolve_model(model, base), vae=vae and _resolve_model(vae, base),
        allow_pickle=allow_pickle, device=device, store_url=store_url,
        workspace=base / WORKSPACE_DIR, params=params, stages=modules, dataset_name=dataset_name, publish=publish,
    )


def _dataset(table: Any, base: Path, problems: list) -> tuple[str, bool]:
    """[dataset] name (default: the config folder's name, made a valid name) and publish (default true:
    `run encode` and `run all` publish the training-ready rows so any machine can train from the store)."""
    default = re.sub(r"[^A-Za-z0-9_.-]+", "-", base.name).strip("-._")[:100] or "dataset"
    if not isinstance(table, dict):
        problems.append(("dataset", "must be a table: [dataset] name = ..."))
        return default, True
    for key in table:
        if key not in ("name", "publish"):
            problems.append((f"dataset.{key}", unknown_key(key, ["name", "publish"])))
    name = table.get("name", default)
    if not isinstance(name, str) or not DATASET_NAME.fullmatch(name):
        problems.append(("dataset.name", f"{name!r} is not a dataset name: 1-100 letters, digits, '_', '-' or '.', "
                                         "starting with a letter or digit"))
        name = default
    publish = table.get("publish", True)
    if not isinstance(publish, bool):
        problems.append(("dataset.publish", "must be true or false"))
        publish = True
    return name, publish


def _resolve_model(spec: str, base: Path) -> str:
    """A relative path that exists beside the config wins over a Hub id."""
    if spec == "tiny" or Path(spec).is_absolute():
        return spec
    candidate = base / spec
    return str(candidate) if candidate.exists() else spec


def _resolve_url(url: str, base: Path) -> str:
    if "://" in url or Path(url).is_absolute():
        return url
    return str(base / url)


def unknown_key(key: str, known) -> str:
    """`unknown key; did you mean max_steps?`: the close matches, never the whole list."""
    close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
    if close:
        return "unknown key; did you mean " + " or ".join(close) + "?"
    return f"unknown key ({len(known)} known; e.g. {', '.join(sorted(known)[:4])}, ...)"


def _set_item(key: str, from_set: dict[str, str]) -> str | None:
    """The `--set` text behind a problem's key (`train.max_steps`, or a key inside a table it set), if any."""
    for dotted, item in from_set.items():
        if key == dotted or key.startswith(dotted + ".") or key.startswith(dotted + "["):
            return item
    return None


def _apply_override(raw: dict, item: str, problems: list) -> str | None:
    """`--set train.max_steps=5`: the value is parsed as TOML, else kept as a string. Returns the dotted key."""
    if "=" not in item:
        problems.append((item, "--set wants KEY=VALUE, e.g. --set train.max_steps=5"))
        return None
    dotted, value_text = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {value_text}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text
    *parents, leaf = dotted.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            problems.append((dotted, f"{part} is not a table"))
            return None
    node[leaf] = value
    return dotted.strip()


def _build(cls: type, table: dict, prefix: str, base: Path, problems: list) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        where = f"{prefix}.{key}"
        if key not in fields:
            problems.append((where, unknown_key(key, fields)))
            continue
        ok, coerced = _coerce(value, hints[key], where, base, problems)
        if ok:
            if fields[key].metadata.get("path") and coerced is not None:
                coerced = str((base / coerced).resolve()) if not Path(coerced).is_absolute() else coerced
            if fields[key].metadata.get("url") and coerced:
                coerced = _resolve_url(coerced, base)  # a path or an fsspec URL, as [store] url
            values[key] = coerced
    try:
        return cls(**values)
    except TypeError as e:  # a required field is missing
        problems.append((prefix, str(e)))
        return None


def _coerce(value: Any, hint: Any, where: str, base: Path, problems: list) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return True, None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where, base, problems)
    if origin is Literal:
        if value in args:
            return True, value
        problems.append((where, f"must be one of {', '.join(repr(a) for a in args)}, not {value!r}"))
        return False, None
    if origin is tuple:
        if not isinstance(value, (list, dict)):
            # `formats = "kohya"` would be read as one item by some and as letters by others: say so.
            example = f"[{_toml(value)}]"
            problems.append((where, f"must be a list, not {value!r}: write {where.rpartition('.')[2]} = {example}"))
            return False, None
        if isinstance(value, dict):
            value = [value]  # a single [table] where [[tables]] belong: one entry
        out = []
        for i, item in enumerate(value):
            ok, c = _coerce(item, args[0], f"{where}[{i}]", base, problems)
            if not ok:
                return False, None
            out.append(c)
        return True, tuple(out)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            problems.append((where, "must be a table"))
            return False, None
        built = _build(hint, value, where, base, problems)
        return built is not None, built
    if hint is bool:
        if isinstance(value, bool):
            return True, value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
    elif hint is str:
        if isinstance(value, str):
            return True, value
    problems.append((where, f"must be {getattr(hint, '__name__', hint)}, not {value!r}"))
    return False, None


def _toml(value: Any) -> str:
    import json

    return json.dumps(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def path_settings(params: Any) -> list[tuple[str, dict]]:
    """Every path setting's value in a stage's Params (nested tables and lists too), with its field's
    metadata, in field order; unset ones ("" or None) left out."""
    found: list[tuple[str, dict]] = []
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if f.metadata.get("path"):
            if value:
                found.append((value, dict(f.metadata)))
        elif f.metadata.get("url") and value and "://" not in value.removeprefix("file://"):
            found.append((value.removeprefix("file://"), dict(f.metadata)))  # a store on this machine: a path
        for item in value if isinstance(value, tuple) else (value,):
            if dataclasses.is_dataclass(item):
                found += path_settings(item)
    return found

"""The Runs page's data: every training run in the workspace, from the files the train stage leaves.

A run is a folder `.sdxlpipe/train/<train key>/` (stages/train.py): `key.json`
(what shapes its weights), `config.json` (the resolved config), `logs/log.jsonl`
(scalars per step), `validation/step-N/` (images), `checkpoints/step-N/`, and
`done.json` once finished. Exports are found by their `<name>.export.json`
records in each run's `export.output_dir`, and described as `lora info` would
(`lora.read.read_lora_header`, no torch). The list (`runs`) is small; each run's curves and
images (`run/<key>`) are loaded when the run is opened.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

STEP_DIR = re.compile(r"^step-(\d+)$")


def collect(workspace: Path) -> tuple[list[dict], dict[str, dict], dict[str, list[tuple[Path, str]]]]:
    """(the run list, each run's detail by key, each run's files to put in the site: (file, site path)).

    Runs are ordered by when they started (key.json's mtime); each one's settings are compared with the
    run before it.
    """
    root = workspace / "train"
    dirs = [d for d in root.iterdir() if d.is_dir() and (d / "key.json").is_file()] if root.is_dir() else []
    dirs.sort(key=lambda d: ((d / "key.json").stat().st_mtime, d.name))
    listing, details, files = [], {}, {}
    previous: dict | None = None
    for d in dirs:
        config = _read_json(d / "config.json") or {}
        flat = _flatten(config)
        done = _read_json(d / "done.json")
        log = _read_log(d / "logs" / "log.jsonl")
        validation, images = _validation(d, config)
        exports = _exports(d.name, config)
        changed = _diff(previous, flat) if previous is not None else None
        steps = [s for s in (log.get("loss") or [])]
        listing.append({
            "key": d.name, "started": (d / "key.json").stat().st_mtime,
            "finished": (d / "done.json").stat().st_mtime if done else None,
            "steps_done": steps[-1][0] if steps else 0,
            "steps": done["steps"] if done else _planned_steps(config),
            "network": (config.get("train") or {}).get("network"),
            "final_loss": done.get("final_loss") if done else None,
            "best_validation": (done or {}).get("best_validation"),
            "changed": None if changed is None else len(changed),
            "exports": sum(len(e["files"]) for e in exports),
        })
        details[d.name] = {
            "key": d.name, "config": config, "changed": changed, "done": done, "log": log,
            "validation": validation, "checkpoints": _checkpoints(d), "exports": exports,
        }
        files[d.name] = images
        previous = flat
    return listing, details, files


def _planned_steps(config: dict) -> int | None:
    train = config.get("train") or {}
    return None if train.get("max_epochs") else train.get("max_steps")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_log(path: Path) -> dict[str, list]:
    """log.jsonl as {scalar: [[step, value], ...]}; a torn last line (a killed run) is skipped."""
    series: dict[str, list] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return series
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or "step" not in row:
            continue
        for name, value in row.items():
            if name != "step" and isinstance(value, (int, float)):
                series.setdefault(name, []).append([row["step"], value])
    return series


def _validation(run: Path, config: dict) -> tuple[dict, list[tuple[Path, str]]]:
    """Validation images per step: {"prompts", "steps": [[step, [image names]]]} and the files to copy."""
    train = config.get("train") or {}
    steps, files = [], []
    folder = run / "validation"
    for d in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = STEP_DIR.match(d.name)
        if not m:
            continue
        names = sorted(p.name for p in d.glob("prompt-*.png"))
        steps.append([int(m.group(1)), names])
        files += [(d / n, f"runs/{run.name}/validation/{d.name}/{n}") for n in names]
    return {"prompts": train.get("validation_prompts") or [], "steps": steps}, files


def _checkpoints(run: Path) -> list[dict]:
    folder = run / "checkpoints"
    out = []
    for d in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = STEP_DIR.match(d.name)
        if m:
            sizes = {p.name: p.stat().st_size for p in d.iterdir() if p.is_file()}
            out.append({"step": int(m.group(1)), "path": str(d), "files": sizes})
    return out


def _exports(key: str, config: dict) -> list[dict]:
    """This run's exports: the `<name>.export.json` records in its export folder that name its key."""
    from sdxlpipe.lora.read import read_lora_header

    folder = Path((config.get("export") or {}).get("output_dir") or "")
    out = []
    for record_path in sorted(folder.glob("*.export.json")) if folder.is_dir() else []:
        record = _read_json(record_path)
        if not isinstance(record, dict) or record.get("train") != key:
            continue
        files = []
        for fmt, name in sorted((record.get("files") or {}).items()):
            path = Path(name)
            entry = {"format": fmt, "path": str(path), "bytes": path.stat().st_size if path.is_file() else None}
            if path.is_file() and path.suffix == ".safetensors":
                try:
                    info = read_lora_header(path).summary()
                    entry["info"] = {k: v for k, v in info.items() if k != "metadata"}
                    entry["metadata"] = info["metadata"]
                except Exception as e:  # noqa: BLE001 - a file another tool wrote: say why, show the rest
                    entry["error"] = str(getattr(e, "what", e))
            files.append(entry)
        out.append({"record": str(record_path), "name": record_path.name[:-len(".export.json")], "files": files})
    return out


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"train.rank": 16, "ingest.sources[0].path": ...}: the settings as dotted keys, for the diff."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def _diff(before: dict[str, Any], after: dict[str, Any]) -> list[list]:
    """[[setting, before, after]] for every setting that differs (absent: null)."""
    return [[k, before.get(k), after.get(k)] for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]

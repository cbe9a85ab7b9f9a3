"""`sdxlpipe status`: per stage, what is up to date, what must run, and why.

It is a dry run of the pipeline: keys are computed from file stats, the
content-hash memo, the store index and the weights' fingerprints, never
from a model, so it imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdxlpipe.config import Config


def status(config: Config, target: str = "all") -> dict[str, Any]:
    from sdxlpipe.pipeline.runner import run_pipeline  # pyarrow: not needed to format a recorded answer

    report = run_pipeline(config, target, dry_run=True)
    stages = {
        # cannot_run: items a run would refuse or fail as asked (the reasons say why and what to change).
        name: {"items": s["items"], "units": s["units"], "up_to_date": s["reused"], "to_compute": s["computed"],
               "cannot_run": s["failed"], "reasons": s["reasons"]}
        for name, s in report["stages"].items()
    }
    return {"stages": stages, "rejected": report["rejected"],
            "up_to_date": all(s["to_compute"] == 0 and s["cannot_run"] == 0 for s in stages.values()),
            **({"datasets": report["outputs"]["datasets"]} if "datasets" in report["outputs"] else {})}


def format_status(result: dict[str, Any]) -> str:
    lines = []
    for name, s in result["stages"].items():
        line = (f"{name:12} {s['items']:>7} {s['units']:8} {s['up_to_date']:>7} up to date"
                f"  {s['to_compute']:>7} to compute")
        if s["cannot_run"]:
            line += f"  {s['cannot_run']} cannot run"
        if s["reasons"]:
            line += "  (" + "; ".join(s["reasons"]) + ")"
        lines.append(line)
    for d in result.get("datasets", []):
        lines.append(f"dataset      {d['samples']:>7} samples from {d['name']}@{d['snapshot']} in {d['store']}")
    if result["rejected"]:
        lines.append(f"{len(result['rejected'])} file(s) rejected; `sdxlpipe run ingest --json` lists them")
    blocked = [name for name, s in result["stages"].items() if s["cannot_run"]]
    if blocked:
        lines.append(f"`sdxlpipe run all` would fail at {', '.join(blocked)}: see the reason above.")
    else:
        lines.append("Data and pipelines are up to date." if result["up_to_date"] else "Run `sdxlpipe run all` to bring them up to date.")
    return "\n".join(lines)

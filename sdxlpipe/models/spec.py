"""What a model spec string names: the tiny stack, a directory, a Hub id, a file.

Torch-free: `fingerprints.py` resolves specs on the no-op path. `loading.py`
resolves them the same way, so the weights that are fingerprinted are the
weights that are loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sdxlpipe.errors import UserError

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = (".safetensors", ".sft")
# owner/name, as the Hub spells repository ids
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(UserError):
    """A model spec that cannot be used; `what` names the spec, `hint` the fix."""


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # "tiny" | "dir" | "file"
    path: Path | None = None  # the directory (a Hub snapshot for Hub ids) or the file
    hub_id: str | None = None  # set when the directory is a Hub cache snapshot
    spec: str = ""  # as the user wrote it, for messages


def resolve_spec(spec: str, base_dir: Path | None = None, allow_pickle: bool = False) -> ModelSpec:
    """Say what `spec` names. Relative paths resolve against `base_dir` (default: cwd)."""
    if spec == "tiny":
        return ModelSpec("tiny", spec=spec)
    path = Path(spec).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if path.is_dir():
        return ModelSpec("dir", path=path, spec=spec)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelError(
                f"model {spec!r} is a pickle checkpoint ({suffix}); loading one can run arbitrary code",
                "use a .safetensors file or a diffusers directory, or pass --allow-pickle if you trust the file",
            )
        _require_file(path, spec)
        return ModelSpec("file", path=path, spec=spec)
    if suffix in SINGLE_FILE_SUFFIXES:
        _require_file(path, spec)
        return ModelSpec("file", path=path, spec=spec)
    if _HUB_ID.match(spec) and not path.exists():
        return ModelSpec("dir", path=hub_snapshot(spec), hub_id=spec, spec=spec)
    if path.exists():
        raise ModelError(
            f"model {spec!r} is a file of a kind sdxlpipe does not load",
            "give a diffusers directory, a Hub id, a .safetensors checkpoint, or `tiny`",
        )
    raise ModelError(
        f"model {spec!r} not found (looked for {path})",
        "give a diffusers directory, a Hub id (owner/name), a .safetensors checkpoint, or `tiny`",
    )


def hub_snapshot(repo_id: str, revision: str = "main") -> Path:
    """The local snapshot directory of a Hub model, without touching the network."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    repo = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else None
    snapshot = repo / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        raise ModelError(
            f"model {repo_id!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE})",
            f"download it once with `hf download {repo_id}` (sdxlpipe never downloads), "
            "or check the spelling; a local path must exist",
        )
    return snapshot


def _require_file(path: Path, spec: str) -> None:
    if not path.is_file():
        raise ModelError(f"model file {spec!r} not found (looked for {path})", "check the path in `model` / `vae`")

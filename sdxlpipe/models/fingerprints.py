"""Per-component fingerprints of model weights, without importing torch.

Each component (unet, vae, both text encoders, both tokenizers, scheduler)
gets its own xxh3-128, so a new VAE invalidates latents and nothing else.
This runs on the no-op path: it reads file stats through the caller's memoized
`hash_file`, never opens a weight file that is already memoized, and never
imports torch, diffusers or transformers.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import xxhash

from sdxlpipe.cache_format.codec import encode_json
from sdxlpipe.models.spec import COMPONENTS, ModelError, ModelSpec, resolve_spec
from sdxlpipe.models.tiny_config import TINY_VERSION, tiny_configs


def model_fingerprints(
    spec: str,
    vae_override: str | None,
    hash_file: Callable[[Path], str],
    base_dir: Path,
    allow_pickle: bool = False,
) -> dict[str, str]:
    """xxh3-128 hex per component of the model `spec` (with `vae_override` for "vae")."""
    resolved = resolve_spec(spec, base_dir, allow_pickle)
    prints = {name: _component(resolved, name, hash_file) for name in COMPONENTS}
    if vae_override:
        vae = resolve_spec(vae_override, base_dir, allow_pickle)
        if vae.kind == "tiny":
            raise ModelError(f"vae {vae_override!r}: `tiny` names a whole model, not a VAE", "give a VAE directory, Hub id or file")
        prints["vae"] = _component(vae, "vae", hash_file, vae_only=True)
    return prints


def _component(spec: ModelSpec, name: str, hash_file: Callable[[Path], str], vae_only: bool = False) -> str:
    if spec.kind == "tiny":
        configs = tiny_configs()
        return _digest({
            "component": name,
            "tiny_version": TINY_VERSION,
            "seed": configs["seed"],
            "config": configs[name],
            # Seeded random init is only reproducible within one version of
            # the libraries that draw it.
            "libraries": _tiny_library_versions(),
        })
    if spec.kind == "file":
        # One checkpoint holds every component: any change to it changes them all.
        return _digest({"component": name, "file": hash_file(spec.path)})
    folder = spec.path / name
    if vae_only and not folder.is_dir():
        folder = spec.path  # a VAE repo keeps config.json and weights at its root
    if not folder.is_dir():
        raise ModelError(
            f"model {spec.spec!r} has no {name}/ folder (looked in {spec.path})",
            "give a diffusers directory with unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/",
        )
    files = {rel: _file_hash(folder / rel, hash_file) for rel in _files(folder)}
    return _digest({"component": name, "files": files})


@functools.cache  # importlib.metadata scans every installed package per call: once per process
def _tiny_library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for dist in ("torch", "diffusers", "transformers", "tokenizers"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = "absent"
    return found


def _files(folder: Path) -> list[str]:
    found = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for n in names:
            if not n.startswith("."):
                found.append((Path(root) / n).relative_to(folder).as_posix())
    return sorted(found)


def _file_hash(path: Path, hash_file: Callable[[Path], str]) -> str:
    # A Hugging Face cache snapshot links each file to a blob named by its
    # sha256 (LFS) or git sha1: the name stands in for reading the bytes.
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if target.parent.name == "blobs":
            return "blob:" + target.name
    return hash_file(path)


def _digest(obj: object) -> str:
    # The store's canonical JSON: the same bytes json.dumps(sort_keys, no spaces) gave here
    # before for every ASCII document (all of a diffusers folder's names are).
    return xxhash.xxh3_128_hexdigest(encode_json(obj))

"""`status` is a question: it creates no store, no FORMAT and no workspace, local or remote."""

from pathlib import Path

import fsspec

from tests.conftest import cli


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_status_on_a_new_local_store_creates_nothing(example):
    before = _tree(example.parent)
    store = example.parent / "shared-store"
    example.write_text(example.read_text() + f'\n[store]\nurl = "{store}"\n')
    before = _tree(example.parent)

    out = cli("status", "-c", str(example), "--json")

    assert '"vae_encode"' in out.stdout
    assert not store.exists()
    assert _tree(example.parent) == before


def test_status_on_a_store_url_creates_nothing(example):
    from sdxlpipe.config import load_config
    from sdxlpipe.pipeline.status import status

    url = "memory://status-creates-nothing/store"
    result = status(load_config(example, [f'store.url="{url}"']), "text_encode")

    assert result["stages"]["vae_encode"]["to_compute"] == 32
    assert not fsspec.filesystem("memory").exists("/status-creates-nothing")
    assert not (example.parent / ".sdxlpipe").exists()

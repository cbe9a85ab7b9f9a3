"""Given LoRA files, `lora resize` and `lora merge` write new ones and report the error they make."""

from __future__ import annotations

import json

import pytest
import torch

from sdxlpipe.lora.formats import save_diffusers_lora, save_kohya_lora
from sdxlpipe.lora.read import read_lora
from sdxlpipe.lora.tools import delta, merge_loras, resize_lora, save_modules
from tests.conftest import cli
from tests.lora.test_formats import ALPHA, RANK


@pytest.fixture(scope="module")
def files(lora_unet, tmp_path_factory):
    from peft.utils import get_peft_model_state_dict

    out = tmp_path_factory.mktemp("tools")
    state = get_peft_model_state_dict(lora_unet, adapter_name="default")
    config = lora_unet.peft_config["default"].to_dict()
    return {"kohya": save_kohya_lora(out / "a.safetensors", state, config, unet_config=dict(lora_unet.config)),
            "diffusers": save_diffusers_lora(out / "a.diffusers.safetensors", state, config), "out": out}


def by_name(lora):
    return {(m.component, m.name): m for m in lora.modules}


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_resize_keeps_the_strength_and_reports_the_error_it_makes(files, fmt):
    lora = read_lora(files[fmt])
    assert {m.scale for m in lora.modules} == {ALPHA / RANK}
    modules, reports = resize_lora(lora, rank=2)
    out = save_modules(files["out"] / f"r2-{fmt}.safetensors", modules, "kohya" if fmt == "kohya" else "diffusers")
    resized = by_name(read_lora(out))
    original = by_name(lora)
    assert len(resized) == len(original) == len(reports)
    for r in reports:
        old, new = original[(r.component, r.module)], resized[(r.component, r.module)]
        assert new.rank == 2 and new.scale == pytest.approx(old.scale)  # alpha / rank kept
        d = delta(old)
        measured = float(torch.linalg.norm(d - delta(new)) / torch.linalg.norm(d))
        assert measured == pytest.approx(r.rel_error, rel=1e-4, abs=1e-6)
    assert max(r.rel_error for r in reports) > 0.01
    # At the rank it already has, nothing is lost.
    _, same = resize_lora(lora, rank=RANK)
    assert max(r.rel_error for r in same) < 1e-5


def test_merge_stacks_exactly_and_svd_merges_report_their_error(files):
    a = read_lora(files["kohya"])
    modules, _ = merge_loras([a, a], [1.0, 0.5])
    for m in modules:
        assert torch.allclose(delta(m), 1.5 * delta(by_name(a)[(m.component, m.name)]), atol=1e-5)
    low, reports = merge_loras([a, a], [1.0, 0.5], rank=2)
    for m, r in zip(low, reports):
        want = 1.5 * delta(by_name(a)[(m.component, m.name)])
        measured = float(torch.linalg.norm(want - delta(m)) / torch.linalg.norm(want))
        assert measured == pytest.approx(r.rel_error, rel=1e-4, abs=1e-6)
    with pytest.raises(Exception, match="mix kohya and diffusers"):
        merge_loras([a, read_lora(files["diffusers"])], [1.0, 1.0])


def test_merge_into_a_base_model_on_the_command_line(files, lora_unet, tmp_path):
    from sdxlpipe.models.loading import load_unet
    from tests.lora.test_formats import unet_output

    out = tmp_path / "merged.safetensors"
    report = json.loads(cli("lora", "merge", str(files["kohya"]), "--weights", "1", "--into", "tiny", "-o", str(out),
                            "--json").stdout)
    assert report["modules_folded"] == len(read_lora(files["kohya"]).modules)
    # The base with the LoRA folded in gives the adapted UNet's output.
    assert (unet_output(load_unet(str(out))) - unet_output(lora_unet)).abs().max() < 1e-4

    bad = cli("lora", "merge", str(files["kohya"]), "--weights", "1,2", "-o", str(tmp_path / "x.safetensors"), check=False)
    assert bad.returncode == 2 and "Error: --weights has 2 value(s) for 1 file(s)" in bad.stderr

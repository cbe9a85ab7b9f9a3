"""`read_lora_header` says what `lora info` says about a file, from its header alone (no torch): the report's
description of each export."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sdxlpipe.lora.read import LoraFileError, read_lora, read_lora_header
from tests.lora.test_info import files  # noqa: F401 - kohya (fp16, LoCon), LyCORIS LoHa, diffusers files


def summary(path):
    return read_lora_header(path).summary()


@pytest.mark.parametrize("name", ["kohya", "loha", "diffusers", "bare"])
def test_the_header_summary_is_lora_infos(files, name):  # noqa: F811
    path = files / f"{name}.safetensors"
    assert summary(path) == read_lora(path).summary()


def test_bf16_alphas_and_a_file_that_is_no_lora(tmp_path):
    path = tmp_path / "bf16.safetensors"
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": torch.ones(4, 640, dtype=torch.bfloat16),
               f"{name}.lora_up.weight": torch.ones(640, 4, dtype=torch.bfloat16),
               f"{name}.alpha": torch.tensor(2.5, dtype=torch.bfloat16)}, path)
    assert summary(path) == read_lora(path).summary() and summary(path)["alphas"] == [2.5]
    (tmp_path / "notes.safetensors").write_text("not a safetensors file")
    with pytest.raises(LoraFileError, match="notes.safetensors"):
        summary(tmp_path / "notes.safetensors")

"""Given a finished train run, the export stage writes the files each network needs, with kohya's
metadata, atomically, readable by others, and says `up to date` when nothing changed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from sdxlpipe.stages import export
from tests.conftest import cli
from tests.training.conftest import build_samples, make_context, params, run_train

CAPTIONS = ["red, cube, shiny", "red, sphere", "blue, cube"]


def with_captions(table: pa.Table) -> pa.Table:
    """The table's captions as booru tags (what ss_tag_frequency counts), one per row, cycling."""
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(table.num_rows)]
    return table.set_column(table.column_names.index("caption"), "caption", pa.array(captions))


def readable_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@pytest.fixture(scope="module")
def lora_export(tmp_path_factory):
    """A LoRA (rank 4, alpha 8, LoCon conv rank 2 alpha 5) trained 2 epochs of 3 samples, batch 2, exported."""
    root = tmp_path_factory.mktemp("lora-export")
    train = dict(rank=4, alpha=8.0, conv_rank=2, conv_alpha=5.0, max_epochs=2, max_steps=500, save_every_steps=100)
    ctx = make_context(root / "ws", **train)
    table = build_samples(ctx, 3)
    done = run_train(ctx, table, params(**train))
    ctx.stage = "export"
    table = with_captions(table)
    out = export.Params(output_dir=str(root / "out"), name="shapes")
    export.run(table, out, ctx)
    return {"ctx": ctx, "table": table, "done": done, "params": out, "out": root / "out"}


def test_default_lora_export_writes_kohya_and_diffusers_files_that_reload_as_trained(lora_export, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import set_peft_model_state_dict

    from sdxlpipe.models.tiny import save_tiny
    from sdxlpipe.training import networks
    from tests.lora.test_formats import unet_output

    out = lora_export["out"]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["shapes.diffusers.safetensors", "shapes.export.json", "shapes.safetensors"]
    model = save_tiny(tmp_path / "tiny")
    trained = StableDiffusionXLPipeline.from_pretrained(model, local_files_only=True)
    p = params(rank=4, alpha=8.0, conv_rank=2, conv_alpha=5.0)
    networks.attach(trained.unet, p)
    set_peft_model_state_dict(trained.unet, load_file(lora_export["done"]["outputs"]["weights"]), adapter_name="default")
    want = unet_output(trained.unet)
    for name in ("shapes.safetensors", "shapes.diffusers.safetensors"):
        pipe = StableDiffusionXLPipeline.from_pretrained(model, local_files_only=True)
        pipe.load_lora_weights(str(out / name))
        assert (unet_output(pipe.unet) - want).abs().max() < 1e-5, name


def test_kohya_metadata_is_what_kohya_writes(lora_export):
    path = lora_export["out"] / "shapes.safetensors"
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    # 3 samples, batch 2: 2 batches per epoch, 2 epochs -> 4 steps (max_steps = 500 is ignored).
    assert lora_export["done"]["steps"] == 4
    assert meta["ss_max_train_steps"] == "4" and meta["ss_num_epochs"] == "2"
    assert json.loads(meta["ss_tag_frequency"]) == {"images": {"red": 2, "cube": 2, "shiny": 1, "sphere": 1, "blue": 1}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"images": {"n_repeats": 1, "img_count": 3}}
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "8")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "5"}
    assert meta["ss_resolution"] == "(1024, 1024)" and meta["modelspec.resolution"] == "1024x1024"
    assert int(meta["ss_training_started_at"]) <= int(meta["ss_training_finished_at"])
    for key in ("ss_noise_offset", "ss_min_snr_gamma", "ss_multires_noise_iterations", "ss_lr_scheduler",
                "ss_optimizer", "ss_seed", "ss_base_model_version", "modelspec.date", "modelspec.title",
                "sdxlpipe_dataset_fingerprint", "sdxlpipe_base_fingerprint", "sdxlpipe_config"):
        assert meta[key], key
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["sdxlpipe_train_key"] == lora_export["ctx"].outputs["train"]["key"]
    assert json.loads(meta["sdxlpipe_config"])["model"] == "tiny"
    # kohya's hashes: computed on the file as saved with only the ss_* metadata.
    data = safetensors_bytes(tensors, metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest()
    assert meta["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    # SGM names, as kohya writes them, for attention and LoCon convolutions alike.
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight" in tensors
    assert float(tensors["lora_unet_input_blocks_1_0_in_layers_2.alpha"]) == 5.0


def test_files_are_readable_by_others_and_a_rerun_is_up_to_date(lora_export):
    out, ctx = lora_export["out"], lora_export["ctx"]
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == readable_mode(), path.name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    record = json.loads((out / "shapes.export.json").read_text())
    assert record["network"] == "lora" and set(record["files"]) == {"kohya", "diffusers"}
    notes = ctx.outputs["lora_for"]
    assert notes[str(out / "shapes.safetensors")].startswith("for ComfyUI, A1111/Forge")
    assert notes[str(out / "shapes.diffusers.safetensors")].endswith("give them shapes.safetensors")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    ctx.outputs.pop("lora_up_to_date", None)
    export.run(lora_export["table"], lora_export["params"], ctx)
    assert ctx.outputs["lora_up_to_date"] is True
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def make_model_context(root: Path, model: str, **train):
    """make_context with another base model."""
    ctx = make_context(root, **train)
    toml = root / "sdxlpipe.toml"
    toml.write_text(toml.read_text().replace('model = "tiny"', f'model = "{model}"'))
    from sdxlpipe.config import load_config
    from sdxlpipe.pipeline.context import Models

    ctx.config = load_config(toml, [f"train.{k}={json.dumps(v)}" for k, v in train.items()])
    ctx.models = Models(ctx.config, ctx.memo)
    return ctx


@pytest.fixture(scope="module")
def full_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("full-export")
    ctx = make_context(root / "ws", network="full")
    table = build_samples(ctx, 2)
    done = run_train(ctx, table, params(network="full", max_steps=2, save_every_steps=2))
    ctx.stage = "export"
    # extract_rank above every layer's rank: the extracted LoRA must reproduce the fine-tune.
    export.run(table, export.Params(output_dir=str(root / "out"), name="tuned", extract_rank=100_000), ctx)
    return {"done": done, "out": root / "out", "root": root}


def test_full_fine_tune_exports_a_pipeline_folder_and_a_single_file_with_the_trained_weights(full_export, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from sdxlpipe.models.tiny import build_tiny_component, save_tiny

    out = full_export["out"]
    assert sorted(p.name for p in out.iterdir()) == [
        "tuned-extracted.safetensors", "tuned-pipeline", "tuned.export.json", "tuned.safetensors"]
    trained = load_file(full_export["done"]["outputs"]["weights"])
    assert not all(torch.equal(trained[k], v) for k, v in build_tiny_component("unet").state_dict().items())
    folder = StableDiffusionXLPipeline.from_pretrained(out / "tuned-pipeline", local_files_only=True)
    single = StableDiffusionXLPipeline.from_single_file(str(out / "tuned.safetensors"), config=str(save_tiny(tmp_path / "t")),
                                                        local_files_only=True)
    for pipe in (folder, single):
        state = pipe.unet.state_dict()
        assert all(torch.equal(state[k], trained[k]) for k in trained)
    base_vae = build_tiny_component("vae").state_dict()
    assert all(torch.equal(single.vae.state_dict()[k], v) for k, v in base_vae.items())
    for path in [out / "tuned.safetensors", *(out / "tuned-pipeline").rglob("*")]:
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == readable_mode(), path
    with safe_open(out / "tuned.safetensors", "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


def test_sdxlpipe_trains_from_the_single_file_as_its_base_model(full_export, tmp_path):
    from sdxlpipe.models.loading import load_unet

    single = full_export["out"] / "tuned.safetensors"
    trained = load_file(full_export["done"]["outputs"]["weights"])
    assert all(torch.equal(load_unet(str(single)).state_dict()[k], v) for k, v in trained.items())
    ctx = make_model_context(tmp_path / "ws", str(single))
    table = build_samples(ctx, 2)
    done = run_train(ctx, table, params(max_steps=1, save_every_steps=1))
    assert done["steps"] == 1 and Path(done["outputs"]["weights"]).exists()


def test_single_file_configs_beside_it_or_a_clear_error(full_export, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from sdxlpipe.models.loading import load_unet, load_unet_config
    from sdxlpipe.models.spec import ModelError
    from sdxlpipe.models.tiny import save_tiny

    # Configs in <stem>.config/ are used (here: the tiny stack's, so the file loads).
    single = tmp_path / "community.safetensors"
    shutil.copy(full_export["out"] / "tuned.safetensors", single)
    save_tiny(tmp_path / "community.config")
    assert load_unet_config(str(single))["layers_per_block"] == 1
    # An SDXL-sized file with no configs anywhere (an empty HF cache): the error names what to pass.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    from safetensors.torch import save_file

    big = tmp_path / "sdxl-like" / "model.safetensors"
    big.parent.mkdir()
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, big)
    with pytest.raises(ModelError, match="architecture configs") as error:
        load_unet(str(big))
    assert "model.config" in error.value.hint


def delta_of(trained: dict, base: dict, module: str) -> torch.Tensor:
    return trained[f"{module}.weight"].float() - base[f"{module}.weight"].float()


def test_a_full_rank_extraction_reproduces_every_tuned_linear_and_conv(full_export):
    from sdxlpipe.lora.read import peft_state, read_lora
    from sdxlpipe.models.tiny import build_tiny_component

    trained = load_file(full_export["done"]["outputs"]["weights"])
    unet = build_tiny_component("unet")
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    lora = read_lora(full_export["out"] / "tuned-extracted.safetensors")
    layers = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    changed = [n for n in layers if not torch.equal(trained[f"{n}.weight"], base[f"{n}.weight"])]
    assert len(changed) > 50 and len(lora.modules) == len(changed)
    state, _ = peft_state(lora, "unet", unet)  # SGM names resolve back to every changed module
    for m in lora.modules:
        target = next(k for k in state if k.endswith(".lora_A.weight") and state[k] is m.tensors["down"])
        name = target.removesuffix(".lora_A.weight")
        delta = delta_of(trained, base, name)
        rebuilt = m.scale * (m.tensors["up"].reshape(delta.shape[0], -1) @ m.tensors["down"].reshape(m.rank, -1))
        assert torch.allclose(base[f"{name}.weight"] + rebuilt.reshape(delta.shape), trained[f"{name}.weight"],
                              atol=1e-5, rtol=0), name


def test_lora_extract_reports_the_error_it_makes(full_export, tmp_path):
    from sdxlpipe.lora.extract import relative_error
    from sdxlpipe.lora.read import module_names, read_lora
    from sdxlpipe.models.tiny import build_tiny_component

    out = tmp_path / "r2.safetensors"
    report = json.loads(cli("lora", "extract", "--base", "tiny", "--tuned", str(full_export["out"] / "tuned-pipeline"),
                            "-o", str(out), "--rank", "2", "--json").stdout)
    trained = load_file(full_export["done"]["outputs"]["weights"])
    unet = build_tiny_component("unet")
    base = unet.state_dict()
    names = module_names(unet, "unet")
    written = {names[m.name]: m for m in read_lora(out).modules}
    assert report["modules"] == len(written) == len(report["layers"]) > 50
    errors = []
    for layer in report["layers"]:
        assert layer["rank"] == min(2, layer["full_rank"])
        measured = relative_error(delta_of(trained, base, layer["module"]), written[layer["module"]])
        assert measured == pytest.approx(layer["rel_error"], rel=1e-4, abs=1e-6), layer["module"]
        errors.append(measured)
    assert max(errors) > 0.01, "rank 2 must lose something on some layer, or this test shows nothing"

    bad = cli("lora", "extract", "--base", "tiny", "--tuned", "tiny", "-o", str(tmp_path / "x.safetensors"),
              "--fro", "0.9", "--sv-ratio", "4", check=False)
    assert bad.returncode == 2 and "Error:" in bad.stderr and "Hint:" in bad.stderr


@pytest.mark.parametrize("network", ["ia3", "oft"])
def test_ia3_and_oft_go_out_as_a_peft_folder_that_reloads_as_trained(tmp_path, network):
    from peft import get_peft_config, inject_adapter_in_model
    from peft.utils import set_peft_model_state_dict

    from sdxlpipe.models.tiny import build_tiny_component
    from sdxlpipe.training import networks
    from tests.lora.test_formats import unet_output

    train = dict(network=network, rank=4, learning_rate=5e-2, max_steps=1, save_every_steps=1)
    ctx = make_context(tmp_path / "ws", **train)
    table = build_samples(ctx, 2)
    done = run_train(ctx, table, params(**train))
    ctx.stage = "export"
    export.run(table, export.Params(output_dir=str(tmp_path / "out"), name="n"), ctx)
    folder = tmp_path / "out" / "n-peft"
    record = json.loads((tmp_path / "out" / "n.export.json").read_text())
    assert "peft" in record["metadata"]["sdxlpipe_note"]

    trained = build_tiny_component("unet")
    networks.attach(trained, params(**train))
    networks.load_trained_state(trained, params(**train), load_file(done["outputs"]["weights"]))
    base = unet_output(build_tiny_component("unet"))
    want = unet_output(trained)
    assert (want - base).abs().max() > 1e-4, "one step at lr 5e-2 must move the network"

    unet = build_tiny_component("unet")
    config = get_peft_config(json.loads((folder / "adapter_config.json").read_text()))
    inject_adapter_in_model(config, unet, adapter_name="default")
    result = set_peft_model_state_dict(unet, load_file(folder / "adapter_model.safetensors"), adapter_name="default")
    assert not result.unexpected_keys
    assert (unet_output(unet) - want).abs().max() < 1e-5


def test_ss_num_epochs_is_written_for_a_run_set_by_max_steps_and_the_init_is_recorded(tmp_path):
    """kohya-ss/sd-scripts train_network.py writes ss_num_epochs for every run (num_train_epochs =
    ceil(max_train_steps / update steps per epoch)); we wrote it only when max_epochs set the run's length.
    train.lora_init goes into the metadata beside it (decision 55)."""
    train = dict(rank=4, alpha=8.0, batch_size=2, max_steps=3, save_every_steps=100, lora_init="gaussian")
    ctx = make_context(tmp_path / "ws", **train)
    table = build_samples(ctx, 3)  # 3 samples, batch 2: 2 batches an epoch, so 3 steps cover 2 epochs
    run_train(ctx, table, params(**train))
    ctx.stage = "export"
    export.run(with_captions(table), export.Params(output_dir=str(tmp_path / "out"), name="steps"), ctx)
    with safe_open(tmp_path / "out" / "steps.safetensors", "pt") as f:
        meta = f.metadata()
    assert (meta["ss_max_train_steps"], meta["ss_num_epochs"]) == ("3", "2")
    assert meta["sdxlpipe_lora_init"] == "gaussian"
    with safe_open(tmp_path / "out" / "steps.diffusers.safetensors", "pt") as f:
        assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.init_lora_weights"] == "gaussian"


def test_a_dora_run_exports_the_diffusers_file_by_default_and_refuses_kohya_by_name(tmp_path):
    """No kohya-style DoRA file loads exactly in the tools that read kohya files (decision 57): ComfyUI's
    comfy/weight_adapter/base.py weight_decompose divides an output-axis dora_scale by the *base* weight's norm, A1111's
    extensions-builtin/Lora/network.py apply_weight_decompose decomposes on the input axis only, and diffusers'
    lora_pipeline.py lora_state_dict drops dora_scale keys. Before, the default formats crashed the export with a
    ValueError (a traceback, nothing written)."""
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import set_peft_model_state_dict

    from sdxlpipe.errors import UserError
    from sdxlpipe.models.tiny import save_tiny
    from sdxlpipe.training import networks
    from tests.lora.test_formats import unet_output

    train = dict(rank=4, alpha=8.0, use_dora=True, batch_size=2, max_steps=2, save_every_steps=100, learning_rate=1e-2)
    ctx = make_context(tmp_path / "ws", **train)
    table = build_samples(ctx, 2)
    done = run_train(ctx, table, params(**train))
    ctx.stage = "export"
    export.run(table, export.Params(output_dir=str(tmp_path / "out"), name="dora"), ctx)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dora.diffusers.safetensors", "dora.export.json"]
    model = save_tiny(tmp_path / "tiny")
    trained = StableDiffusionXLPipeline.from_pretrained(model, local_files_only=True)
    networks.attach(trained.unet, params(**train))
    set_peft_model_state_dict(trained.unet, load_file(done["outputs"]["weights"]), adapter_name="default")
    pipe = StableDiffusionXLPipeline.from_pretrained(model, local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "out" / "dora.diffusers.safetensors"))
    assert (unet_output(pipe.unet) - unet_output(trained.unet)).abs().max() < 1e-5
    with pytest.raises(UserError, match="DoRA run .* cannot be written as kohya"):
        export.run(table, export.Params(output_dir=str(tmp_path / "out2"), name="dora", formats=("kohya",)), ctx)

"""Single-file checkpoints: a tiny diffusers SD model is written in the original LDM /
A1111 single-file layout (the key renames of diffusers'
scripts/convert_diffusers_to_original_stable_diffusion.py, generalized here to the tiny
model's block and layer counts), exported with `--config` a diffusers folder of the
same architecture but other weights, and must give the images of the artifact
exported from the original folder. Missing --config and files that are not
checkpoints are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffrt import cli
from diffrt.errors import DiffrtError
from diffrt.export.single_file import export_single_file
from diffrt.runtime.pipeline import Pipeline

# -- diffusers -> original layout (diffusers' conversion script, any block/layer count) ------------------


def _unet_renames(config: dict) -> list[tuple[str, str]]:
    """(original prefix, diffusers prefix) pairs for a UNet2DConditionModel config."""
    per = config["layers_per_block"]
    down, up = config["down_block_types"], config["up_block_types"]
    pairs = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
             ("middle_block.1.", "mid_block.attentions.0."), ("middle_block.0.", "mid_block.resnets.0."),
             ("middle_block.2.", "mid_block.resnets.1.")]
    for i, kind in enumerate(down):
        for j in range(per):
            pairs.append((f"input_blocks.{(per + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if "CrossAttn" in kind:
                pairs.append((f"input_blocks.{(per + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < len(down) - 1:
            pairs.append((f"input_blocks.{(per + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
    for i, kind in enumerate(up):
        for j in range(per + 1):
            pairs.append((f"output_blocks.{(per + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if "CrossAttn" in kind:
                pairs.append((f"output_blocks.{(per + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < len(up) - 1:
            pairs.append((f"output_blocks.{(per + 1) * i + per}.{2 if 'CrossAttn' in kind else 1}.",
                          f"up_blocks.{i}.upsamplers.0."))
    return pairs


RESNET_PARTS = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
                ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]


def convert_unet(state: dict, config: dict) -> dict:
    out = {}
    renames = sorted(_unet_renames(config), key=lambda p: -len(p[1]))  # longest prefix first
    for key, value in state.items():
        new = key
        for original, ours in renames:
            if key.startswith(ours):
                rest = key[len(ours):]
                if "resnets" in ours:
                    for a, b in RESNET_PARTS:
                        rest = rest.replace(b, a)
                new = original + rest
                break
        out["model.diffusion_model." + new] = value
    return out


VAE_ATTENTION = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                 ("proj_out.", "to_out.0.")]


def convert_vae(state: dict, config: dict) -> dict:
    blocks, per = len(config["block_out_channels"]), config["layers_per_block"]
    pairs = [("mid.attn_1.", "mid_block.attentions.0."), ("mid.block_1.", "mid_block.resnets.0."),
             ("mid.block_2.", "mid_block.resnets.1."), ("norm_out.", "conv_norm_out.")]
    for i in range(blocks):
        pairs += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(per)]
        pairs += [(f"decoder.up.{blocks - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.")
                  for j in range(per + 1)]
        if i < blocks - 1:
            pairs += [(f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0."),
                      (f"decoder.up.{blocks - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0.")]
    out = {}
    for key, value in state.items():
        new = key
        for original, ours in pairs:
            new = new.replace(ours, original)
        new = new.replace("conv_shortcut", "nin_shortcut")
        if "mid.attn_1." in new:
            for original, ours in VAE_ATTENTION:
                new = new.replace("mid.attn_1." + ours, "mid.attn_1." + original)
            if new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
                value = value.reshape(*value.shape, 1, 1)  # Linear -> the original's 1x1 Conv
        out["first_stage_model." + new] = value
    return out


def to_single_file(folder, path) -> None:
    """A diffusers SD folder as one original-layout .safetensors file."""
    def state(component):
        return load_file(next((folder / component).glob("*.safetensors")))

    def config(component):
        return json.loads((folder / component / "config.json").read_text())

    text = {"cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in state("text_encoder").items()}
    merged = {**convert_unet(state("unet"), config("unet")), **convert_vae(state("vae"), config("vae")), **text}
    save_file({k: v.contiguous() for k, v in merged.items()}, path)


# -- tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_file(tiny_checkpoint, tmp_path_factory):
    """(the single file, a config folder: the same architecture with other weights)."""
    from diffrt.export.tiny import make_tiny_sd

    folder = tmp_path_factory.mktemp("single")
    path = folder / "tiny-sd15.safetensors"
    to_single_file(tiny_checkpoint("sd15"), path)
    other = make_tiny_sd(folder / "other", kind="sd15", seed=7)
    return path, other


def _images(folder, seed=3):
    with Pipeline.load(folder) as pipe:
        return pipe(["a red car", "a cat"], negative_prompt="blurry", num_inference_steps=3, seed=seed,
                    height=64, width=48, output_type="np").images


def test_single_file_export_equals_the_folder_export(tiny_checkpoint, exported, single_file, tmp_path):
    path, config = single_file
    out = tmp_path / "from-file"
    manifest = export_single_file(path, out, config)
    assert manifest.source["id"] == str(path)
    assert not list(tmp_path.glob(".from-file.single-file-*"))  # the converted folder is removed
    got, want = _images(out), _images(exported("sd15"))
    print(f"single file vs folder: max abs difference {np.max(np.abs(got - want)):.2e}")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # --config's folder holds other weights: equal images mean the file's weights were exported
    original, other = (load_file(next((f / "unet").glob("*.safetensors"))) for f in (tiny_checkpoint("sd15"), config))
    assert not torch.equal(original["conv_in.weight"], other["conv_in.weight"])


def test_missing_config_is_one_line(single_file, tmp_path, capsys):
    path, _ = single_file
    with pytest.raises(DiffrtError, match="needs --config DIFFUSERS_FOLDER"):
        export_single_file(path, tmp_path / "out", None)
    assert cli.main(["export", str(path), str(tmp_path / "out2"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs --config" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize(("name", "content", "message"), [
    ("notes.txt", b"hello", r"not a checkpoint file"),
    ("embedding.safetensors", None, r"diffusers cannot load it as a StableDiffusionPipeline single-file checkpoint"),
])
def test_not_a_checkpoint_is_one_line(single_file, tmp_path, name, content, message):
    _, config = single_file
    path = tmp_path / name
    if content is None:
        save_file({"<cat-toy>": torch.zeros(32)}, path)  # a textual-inversion file, not a model
    else:
        path.write_bytes(content)
    with pytest.raises(DiffrtError, match=message) as info:
        export_single_file(path, tmp_path / "out", config)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_config_that_is_not_a_pipeline_folder(single_file, tmp_path):
    path, _ = single_file
    with pytest.raises(DiffrtError, match="no model_index.json"):
        export_single_file(path, tmp_path / "out", tmp_path)

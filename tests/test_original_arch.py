"""An original-layout checkpoint run with ``--model FOLDER --transformer FILE.pth`` takes the folder's architecture
(heads, head dim, base size, PE interpolation) where the tensor shapes agree; a file-name hint changes only the
base resolution."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from fixtures import make_tiny_pipeline
from PIL import Image

from pixsigma.cli import main as cli
from pixsigma.config import DiTConfig
from pixsigma.pipeline import GenerationRequest, PixSigmaPipeline
from pixsigma.weights import folder_config, from_diffusers_state_dict, load_dit

PROMPT = "a red star above a blue ring"
HEADS, HEAD_DIM = 3, 16  # width 48: not XL's head dim 72, so shapes alone would guess one head


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(pipeline folder whose transformer/ is a diffusers PixArtTransformer2DModel, the same weights as an
    original-layout .pth whose name states no resolution)."""
    from diffusers import PixArtTransformer2DModel

    root = tmp_path_factory.mktemp("original_arch")
    folder = make_tiny_pipeline(root / "pipe", config=DiTConfig(depth=2, hidden_size=HEADS * HEAD_DIM,
                                                                num_heads=HEADS, caption_channels=16,
                                                                sample_size=16, pe_interpolation=0.25))
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                                     out_channels=8, num_layers=2, cross_attention_dim=HEADS * HEAD_DIM,
                                     caption_channels=16, sample_size=16, interpolation_scale=0.25,
                                     use_additional_conditions=False, norm_type="ada_norm_single",
                                     norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True,
                                     activation_fn="gelu-approximate", num_embeds_ada_norm=1000)
    with torch.no_grad():
        for p in model.parameters():  # the default init zeroes outputs, which would hide a wrong head count
            p.normal_(0, 0.05)
    model.save_pretrained(folder / "transformer", safe_serialization=True)
    sd = from_diffusers_state_dict(model.state_dict())
    pth = root / "my-finetune.pth"
    torch.save({"state_dict": sd}, pth)
    return folder, pth


def test_checkpoint_takes_the_folders_architecture(folders):
    folder, pth = folders
    ref = folder_config(folder)
    assert (ref.num_heads, ref.head_dim, ref.sample_size, ref.pe_interpolation) == (HEADS, HEAD_DIM, 16, 0.25)
    assert load_dit(pth).config.num_heads != HEADS  # shapes alone cannot tell the head count
    assert load_dit(pth, like=folder).config == load_dit(folder).config == ref


def test_pipeline_with_original_checkpoint_equals_the_folder(folders, tmp_path):
    folder, pth = folders
    own = PixSigmaPipeline.from_pretrained(str(folder), device="cpu")
    orig = PixSigmaPipeline.from_pretrained(str(folder), transformer=str(pth), device="cpu")
    assert orig.transformer.config == own.transformer.config
    torch.manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([999.0, 10.0])
    y, mask = torch.randn(2, 7, 16), torch.ones(2, 7, dtype=torch.long)
    with torch.no_grad():
        diff = (orig.transformer(x, t, y, mask) - own.transformer(x, t, y, mask)).abs().max().item()
    assert diff <= 1e-6
    req = GenerationRequest(PROMPT, steps=2, seed=5)
    a, b = (np.asarray(p.generate(req).images[0], dtype=np.int16) for p in (own, orig))
    assert np.abs(a - b).max() <= 1
    # the same through the command line
    outs = [tmp_path / "own.png", tmp_path / "orig.png"]
    for out, extra in zip(outs, ([], ["--transformer", str(pth)])):
        assert cli(["generate", PROMPT, "--model", str(folder), *extra, "--steps", "2", "--seed", "5",
                    "--device", "cpu", "--out", str(out)]) == 0
    a, b = (np.asarray(Image.open(o), dtype=np.int16) for o in outs)
    assert np.abs(a - b).max() <= 1


def test_name_hint_changes_only_the_base_resolution(folders, tmp_path):
    folder, pth = folders
    hinted = tmp_path / "my-finetune-2K-MS.pth"
    hinted.write_bytes(pth.read_bytes())
    ref = folder_config(folder)
    got = load_dit(hinted, like=folder).config
    assert got == replace(ref, sample_size=256, pe_interpolation=ref.pe_interpolation * 16)
    assert (got.num_heads, got.head_dim, got.resolution) == (HEADS, HEAD_DIM, 2048)


def test_shapes_that_disagree_keep_the_shape_inference(folders, tmp_path):
    folder, pth = folders
    sd = torch.load(pth, weights_only=True)["state_dict"]
    sd = {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}  # one layer less than the folder's
    shallow = tmp_path / "shallow.pth"
    torch.save(sd, shallow)
    got = load_dit(shallow, like=folder).config
    assert got.depth == 1 and got.resolution == 1024 and got.num_heads == load_dit(shallow).config.num_heads

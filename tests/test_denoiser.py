"""StaticZImageDenoiser against diffusers' ZImageTransformer2DModel (CPU, fp32, tiny random model)."""

import pytest
import torch

from zimage_trt.model.denoiser import StaticZImageDenoiser
from zimage_trt.testing.tiny import make_tiny_components

CAPACITY = 128
CAP_DIM = 32


@pytest.fixture(scope="module")
def transformer():
    return make_tiny_components(seed=3)["transformer"].eval()


def diffusers_output(transformer, latents, timestep, feats, lens):
    with torch.no_grad():
        out = transformer([x.unsqueeze(1) for x in latents], timestep, [f[:n] for f, n in zip(feats, lens)],
                          return_dict=False)[0]
    return torch.stack([o.squeeze(1) for o in out])


def compare(transformer, lens, latent_hw=(32, 32), timesteps=None, capacity=CAPACITY, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch = len(lens)
    latents = torch.randn(batch, 16, *latent_hw, generator=gen)
    timestep = torch.tensor(timesteps if timesteps is not None else [0.5] * batch)
    feats = torch.randn(batch, capacity, CAP_DIM, generator=gen)
    expected = diffusers_output(transformer, latents, timestep, feats, lens)
    with torch.no_grad():
        got = StaticZImageDenoiser(transformer)(latents, timestep, feats, torch.tensor(lens))
    scale = expected.abs().max().item()
    assert scale > 1e-3, "reference output is ~0: the test would prove nothing"
    return (got - expected).abs().max().item() / scale


@pytest.mark.parametrize("length", [1, 31, 32, 33, 100, CAPACITY])
def test_caption_lengths(transformer, length):
    assert compare(transformer, [length]) <= 1e-5


def test_batch_of_unequal_captions(transformer):
    assert compare(transformer, [5, 100], timesteps=[0.2, 0.9]) <= 1e-5


@pytest.mark.parametrize("latent_hw", [(32, 48), (34, 34)])  # non-square; 17x17 tokens need image padding
def test_non_square_and_padded_images(transformer, latent_hw):
    assert compare(transformer, [40], latent_hw=latent_hw) <= 1e-5


@pytest.mark.parametrize("t", [0.0, 0.5, 1.0])
def test_timesteps(transformer, t):
    assert compare(transformer, [20], timesteps=[t]) <= 1e-5


def test_unmasked_layout_equals_masked(transformer):
    """The runtime drops the key mask when the buffer is exactly the padded caption: same result."""
    gen = torch.Generator().manual_seed(1)
    den = StaticZImageDenoiser(transformer)
    latents, t = torch.randn(1, 16, 32, 32, generator=gen), torch.tensor([0.3])
    feats = torch.randn(1, 64, CAP_DIM, generator=gen)
    lens = torch.tensor([40])  # padded to 64 = the buffer
    with torch.no_grad():
        masked = den(latents, t, torch.cat([feats, torch.randn(1, 64, CAP_DIM)], 1), lens)
        unmasked = den(latents, t, feats, lens, mask_caption_keys=False)
    assert (masked - unmasked).abs().max() <= 1e-5 * masked.abs().max()


def test_wrong_rope_positions_are_caught(transformer):
    """The parity check can fail: shifting caption RoPE positions by one breaks it."""
    den = StaticZImageDenoiser(transformer)
    original = den.caption_rope

    def shifted(capacity, batch, device):
        cos, sin = original(capacity + 1, batch, device)
        return cos[:, 1:], sin[:, 1:]

    den.caption_rope = shifted
    gen = torch.Generator().manual_seed(0)
    latents, t = torch.randn(1, 16, 32, 32, generator=gen), torch.tensor([0.5])
    feats = torch.randn(1, CAPACITY, CAP_DIM, generator=gen)
    expected = diffusers_output(transformer, latents, t, feats, [40])
    with torch.no_grad():
        got = den(latents, t, feats, torch.tensor([40]))
    assert (got - expected).abs().max().item() / expected.abs().max().item() > 1e-5


def test_shares_weights_without_copy(transformer):
    den = StaticZImageDenoiser(transformer)
    ours = {p.data_ptr() for p in den.parameters()}
    theirs = {p.data_ptr() for p in transformer.parameters()}
    assert ours and len(ours) == len(list(transformer.parameters()))  # not vacuous: every weight is there
    assert ours <= theirs


def test_rejects_other_patch_sizes():
    from diffusers import ZImageTransformer2DModel

    from zimage_trt.testing.tiny import tiny_transformer_config

    cfg = dict(tiny_transformer_config(), all_patch_size=(4,))
    with pytest.raises(ValueError, match="patch size 2"):
        StaticZImageDenoiser(ZImageTransformer2DModel(**cfg))

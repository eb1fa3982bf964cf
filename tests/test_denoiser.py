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


def test_controlnet_hints_are_added_after_their_places_as_diffusers_adds_block_samples(transformer):
    """Hints [P, B, S, dim] join the stream after main layers `control_places` exactly as diffusers adds
    `controlnet_block_samples[i]` after layer i (a batch of unequal captions: the capacity's extra rows
    are masked keys, so only each item's own [image | padded caption] part of a hint matters)."""
    from zimage_trt.engines import contract

    gen = torch.Generator().manual_seed(5)
    lens, latent_hw = [40, 70], (32, 48)
    latents = torch.randn(2, 16, *latent_hw, generator=gen)
    timestep = torch.tensor([0.3, 0.7])
    feats = torch.randn(2, CAPACITY, CAP_DIM, generator=gen)
    denoiser = StaticZImageDenoiser(transformer)
    places = [len(denoiser.layers) - 1, 0]  # hint order need not follow layer order
    denoiser.set_control_places(places)
    shape = contract.hint_shape(len(places), 2, latent_hw, CAPACITY, denoiser.dim)
    hints = torch.randn(shape, generator=gen)
    with torch.no_grad():
        got = denoiser(latents, timestep, feats, torch.tensor(lens), controlnet_hints=hints)
        plain = denoiser(latents, timestep, feats, torch.tensor(lens))
    n_img = (latent_hw[0] // 2) * (latent_hw[1] // 2)  # 384 tokens, a multiple of 32: no image padding
    expected = []
    for item, length in enumerate(lens):
        joint = n_img + -(-length // 32) * 32
        samples = {place: hints[k, item:item + 1, :joint] for k, place in enumerate(places)}
        with torch.no_grad():
            out = transformer([latents[item].unsqueeze(1)], timestep[item:item + 1], [feats[item, :length]],
                              controlnet_block_samples=samples, return_dict=False)[0]
        expected.append(out[0].squeeze(1))
    expected = torch.stack(expected)
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() / scale <= 1e-5
    assert (got - plain).abs().max().item() / scale > 1e-2, "the hints changed nothing: the test proves nothing"


def test_controlnet_hints_of_a_wrong_shape_or_places_are_refused(transformer):
    denoiser = StaticZImageDenoiser(transformer)
    with pytest.raises(ValueError, match="distinct main-layer indices"):
        denoiser.set_control_places([0, len(denoiser.layers)])
    denoiser.set_control_places([0])
    latents, timestep = torch.zeros(1, 16, 32, 32), torch.tensor([0.5])
    feats, lens = torch.zeros(1, 64, CAP_DIM), torch.tensor([10])
    with pytest.raises(ValueError, match=r"controlnet_hints has shape .*expected \(1, 1, 320, "):
        denoiser(latents, timestep, feats, lens, controlnet_hints=torch.zeros(1, 1, 300, denoiser.dim))

"""`StaticZImageControlNet` against diffusers' `ZImageControlNetModel` on tiny random models (CPU, fp32).

Every variant diffusers knows (Union v1: its own noise refiner; 2.0: "control_layers"; 2.1:
"control_noise_refiner"), 16 and 33 control channels, a batch of unequal captions. Every weight is
random, the zero-initialised before/after projections too (with zeros every hint would be 0 and the
test would prove nothing). Tolerance: 1e-5 of the largest value, fp32: the same maths by two code paths
(real-valued vs complex RoPE, other reduction orders), not bit for bit.
"""

import pytest
import torch

from zimage_trt.model.controlnet import ControlNetMismatch, ControlStep, StaticZImageControlNet
from zimage_trt.model.denoiser import StaticZImageDenoiser
from zimage_trt.testing.tiny import make_tiny_controlnet, make_tiny_transformer, tiny_controlnet_config

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

TRANSFORMER = {"n_layers": 3, "n_refiner_layers": 2}
CAPACITY, CAP_DIM, LATENT_HW = 96, 32, (32, 48)
RELATIVE = 1e-5
VARIANTS = [(None, 16), ("control_layers", 33), ("control_noise_refiner", 33), ("control_noise_refiner", 16)]


@pytest.fixture(scope="module")
def transformer():
    return make_tiny_transformer(seed=3, **TRANSFORMER)


def controlnet_for(transformer, variant, channels):
    from diffusers import ZImageControlNetModel

    model = make_tiny_controlnet(seed=4, variant=variant, control_in_dim=channels, transformer_config=TRANSFORMER,
                                 control_layers_places=[0, 2])
    return ZImageControlNetModel.from_transformer(model, transformer)


def inputs(channels, lens=(40, 70), seed=5):
    gen = torch.Generator().manual_seed(seed)
    batch = len(lens)
    latents = torch.randn(batch, 16, *LATENT_HW, generator=gen)
    context = torch.randn(batch, channels, *LATENT_HW, generator=gen)
    feats = torch.randn(batch, CAPACITY, CAP_DIM, generator=gen)
    return latents, torch.tensor([0.3, 0.7][:batch]), feats, torch.tensor(lens), context


def diffusers_samples(controlnet, latents, timestep, feats, lens, context, scale=1.0):
    """diffusers' hints: {main layer: [B, joint tokens (padded to the longest item), dim]}."""
    with torch.no_grad():
        return controlnet(list(latents.unsqueeze(2).unbind(0)), timestep,
                          [feats[i, :n] for i, n in enumerate(lens.tolist())],
                          list(context.unsqueeze(2).unbind(0)), conditioning_scale=scale)


def item_rows(lens, n_img):
    return [n_img + -(-n // 32) * 32 for n in lens.tolist()]


@pytest.mark.parametrize("variant, channels", VARIANTS)
def test_hints_match_diffusers(transformer, variant, channels):
    controlnet = controlnet_for(transformer, variant, channels)
    latents, timestep, feats, lens, context = inputs(channels)
    expected = diffusers_samples(controlnet, latents, timestep, feats, lens, context, scale=0.7)
    net = StaticZImageControlNet(controlnet, StaticZImageDenoiser(transformer))
    got = net(latents, timestep, feats, lens, context, torch.full((net.hint_count,), 0.7))
    assert sorted(expected) == list(net.control_places) == [0, 2]
    n_img = (LATENT_HW[0] // 2) * (LATENT_HW[1] // 2)
    for k, place in enumerate(net.control_places):
        scale = expected[place].abs().max().item()
        assert scale > 1e-3, "the hints are all but zero: the test proves nothing"
        for item, rows in enumerate(item_rows(lens, n_img)):
            err = (got[k, item, :rows] - expected[place][item, :rows]).abs().max().item()
            assert err <= RELATIVE * scale, f"place {place} item {item}: {err / scale:.2e} of the largest hint"


@pytest.mark.parametrize("variant, channels", VARIANTS)
def test_the_step_with_its_controlnet_matches_diffusers(transformer, variant, channels):
    """The fused path: the denoiser computes the hints inside its forward from its own refined tokens;
    the model output equals diffusers' transformer given diffusers' ControlNet samples."""
    controlnet = controlnet_for(transformer, variant, channels)
    latents, timestep, feats, lens, context = inputs(channels)
    samples = diffusers_samples(controlnet, latents, timestep, feats, lens, context, scale=0.8)
    with torch.no_grad():
        expected = transformer(list(latents.unsqueeze(2).unbind(0)), timestep,
                               [feats[i, :n] for i, n in enumerate(lens.tolist())],
                               controlnet_block_samples=samples, return_dict=False)[0]
        plain = transformer(list(latents.unsqueeze(2).unbind(0)), timestep,
                            [feats[i, :n] for i, n in enumerate(lens.tolist())], return_dict=False)[0]
    expected, plain = torch.stack(expected).squeeze(2), torch.stack(plain).squeeze(2)
    denoiser = StaticZImageDenoiser(transformer)
    net = StaticZImageControlNet(controlnet, denoiser)
    step = ControlStep(net, context, torch.full((net.hint_count,), 0.8))
    with torch.no_grad():
        got = denoiser(latents, timestep, feats, lens, control=step)
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= RELATIVE * scale
    assert (expected - plain).abs().max().item() > 1e-2 * scale, "the ControlNet changed nothing"


def test_scales_are_per_control_place_refiner_places_first(transformer):
    """A list of scales: one per hint, in the order they are made (refiner places, then layer places).
    Zero at a place is that hint left out; equal values are the single float."""
    controlnet = controlnet_for(transformer, "control_noise_refiner", 33)
    latents, timestep, feats, lens, context = inputs(33)
    net = StaticZImageControlNet(controlnet, StaticZImageDenoiser(transformer))
    assert net.hint_count == 2 + 2  # refiner places [0, 1], layer places [0, 2]
    uniform = net(latents, timestep, feats, lens, context, torch.full((4,), 0.5))
    float_scale = diffusers_samples(controlnet, latents, timestep, feats, lens, context, scale=0.5)
    n_img = (LATENT_HW[0] // 2) * (LATENT_HW[1] // 2)
    for item, rows in enumerate(item_rows(lens, n_img)):
        expected = float_scale[2][item, :rows]
        assert (uniform[1, item, :rows] - expected).abs().max() <= RELATIVE * expected.abs().max()
    mixed = net(latents, timestep, feats, lens, context, torch.tensor([0.5, 0.5, 0.0, 0.5]))
    assert mixed[0].abs().max() == 0, "scale 0 at layer place 0: no hint there"
    assert torch.allclose(mixed[1], uniform[1], rtol=0, atol=1e-6 * uniform[1].abs().max().item())
    no_refiner = net(latents, timestep, feats, lens, context, torch.tensor([0.0, 0.0, 0.5, 0.5]))
    assert (no_refiner[1] - uniform[1]).abs().max() > 1e-3 * uniform[1].abs().max(), \
        "the refiner places' scales must reach the hinted noise refiner"


@pytest.mark.parametrize("change, message", [
    ({"dim": 32, "n_heads": 1}, "dim 32 vs the transformer's 64"),
    ({"n_heads": 4}, "n_heads 4 vs the transformer's 2"),
    ({"control_layers_places": [0, 3]}, r"control_layers_places \[0, 3\] are not distinct main-layer indices"),
    ({"control_refiner_layers_places": [0, 2]}, r"control_refiner_layers_places \[0, 2\] are not distinct"),
])
def test_a_controlnet_that_does_not_fit_is_refused_naming_both(transformer, change, message):
    from diffusers import ZImageControlNetModel

    config = tiny_controlnet_config("control_noise_refiner", 33, TRANSFORMER, **change)
    with torch.random.fork_rng(devices=[]):
        model = ZImageControlNetModel(**config)
    with pytest.raises(ControlNetMismatch, match=message):
        StaticZImageControlNet(model, StaticZImageDenoiser(transformer))

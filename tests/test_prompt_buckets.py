"""The text encoder runs on the prompt's own tokens (+1 pad token), rounded up to a 64-token bucket
where CUDA graphs replay it, instead of diffusers' 512: the same features within rounding.

Qwen3 is causal and the tokenizer pads on the right, so pad tokens never reach the real ones; kernels
picked by sequence length round differently, so the features are compared with a tolerance."""

import pytest
import torch

from zimage_trt.runtime.text_encoder import PROMPT_BUCKET, PromptEncoder, encoder_length
from zimage_trt.testing.tiny import make_tiny_components

MAX = 512
# With the chat template and the tiny tokenizer: 19, 28 and 93 tokens (the last in the second bucket).
PROMPTS = ["", "a red fox", "a very detailed prompt about a lighthouse on a cliff at dusk, oil painting"]

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def parts():
    return make_tiny_components(seed=0)


def prompt_encoder(parts, device="cpu", **kwargs):
    return PromptEncoder(parts["text_encoder"], parts["tokenizer"], torch.device(device), **kwargs)


def test_bucket_is_64_and_covers_512_in_8_graphs():
    from zimage_trt.runtime.text_encoder import MAX_GRAPHS

    assert PROMPT_BUCKET == 64
    lengths = {encoder_length([n], MAX, PROMPT_BUCKET) for n in range(0, 700)}
    assert lengths == set(range(64, 513, 64))  # every prompt length lands on one of 8 shapes
    assert MAX_GRAPHS >= 2 * len(lengths)  # batch 1 and 2 keep all their buckets captured


@pytest.mark.parametrize(("tokens", "bucketed", "tight"), [
    (1, 64, 2),
    (62, 64, 63),
    (63, 64, 64),  # 63 real + 1 pad fill the first bucket exactly
    (64, 128, 65),  # the pad token spills into the second bucket
    (65, 128, 66),
    (127, 128, 128),
    (510, 512, 511),
    (511, 512, 512),
    (512, 512, 512),  # no room for a pad token: the full length, as diffusers runs it
    (900, 512, 512),  # truncated to max_sequence_length
])
def test_encoder_length_boundaries(tokens, bucketed, tight):
    assert encoder_length([tokens], MAX, PROMPT_BUCKET) == bucketed
    assert encoder_length([tokens], MAX) == tight


def test_encoder_length_uses_the_longest_prompt_and_caps_at_max_sequence_length():
    assert encoder_length([19, 140, 3], MAX, 64) == 192
    assert encoder_length([19, 140, 3], MAX) == 141
    assert encoder_length([70], 100, 64) == 100  # 128 would pass a max_sequence_length that is no multiple of 64
    assert encoder_length([10], 100, 64) == 64
    with pytest.raises(ValueError, match="bucket must be a positive number of tokens, got 0"):
        encoder_length([10], MAX, 0)


def test_padded_length_tight_on_cpu_bucketed_with_graphs_full_when_asked(parts, monkeypatch):
    cpu = prompt_encoder(parts)
    assert not cpu.runner.use_cuda_graph and not cpu.pad_to_max_length  # the default
    assert cpu.padded_length([19, 40], MAX) == 41

    graphed = prompt_encoder(parts)
    monkeypatch.setattr(graphed.runner, "use_cuda_graph", True)  # what a GPU with graphs has
    assert graphed.padded_length([19, 40], MAX) == 64
    assert graphed.padded_length([19, 64], MAX) == 128

    full = prompt_encoder(parts, pad_to_max_length=True)
    monkeypatch.setattr(full.runner, "use_cuda_graph", True)
    assert full.padded_length([19, 40], MAX) == MAX  # diffusers' padding, graphs or not

    left = prompt_encoder(parts)
    monkeypatch.setattr(left.runner, "use_cuda_graph", True)
    monkeypatch.setattr(left, "tokenizer", _LeftPadding(parts["tokenizer"]))
    assert left.padded_length([19, 40], MAX) == MAX  # left padding would move the real tokens


class _LeftPadding:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.padding_side = "left"


def _recording(encoder, seen):
    """The runner's eager forward (so a CPU run takes the graph path's lengths), recording its shapes."""
    eager = encoder.runner.eager

    def forward(input_ids, mask):
        seen.append(tuple(input_ids.shape))
        return eager(input_ids, mask)

    return forward


def test_bucketed_and_tight_features_equal_the_512_padded_ones(parts, monkeypatch):
    full, tight, bucketed = (prompt_encoder(parts, pad_to_max_length=True), prompt_encoder(parts),
                             prompt_encoder(parts))
    monkeypatch.setattr(bucketed.runner, "use_cuda_graph", True)
    shapes = {}
    for name, encoder in (("full", full), ("tight", tight), ("bucketed", bucketed)):
        shapes[name] = []
        monkeypatch.setattr(encoder.runner, "hidden_states", _recording(encoder, shapes[name]))
    want = full.encode(PROMPTS, MAX)
    longest = max(len(f) for f in want)
    assert 64 < longest < 128  # the long prompt is in the second bucket
    assert shapes["full"] == [(3, MAX)]
    for name, tokens in (("tight", longest + 1), ("bucketed", 128)):
        got = (tight if name == "tight" else bucketed).encode(PROMPTS, MAX)
        assert shapes[name] == [(3, tokens)], name
        assert [g.shape for g in got] == [w.shape for w in want], name
        for g, w in zip(got, want, strict=True):
            # Same maths; only the kernels' blocking differs with the sequence length (fp32 rounding
            # ~1e-6); a pad token leaking into the real ones would move features by O(1).
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bucketed_graphs_equal_the_512_padded_eager_run_and_share_a_graph():
    cuda = torch.device("cuda")
    parts = make_tiny_components(seed=0)
    parts["text_encoder"].to(cuda)
    graphed = PromptEncoder(parts["text_encoder"], parts["tokenizer"], cuda)
    eager = PromptEncoder(parts["text_encoder"], parts["tokenizer"], cuda, use_cuda_graph=False,
                          pad_to_max_length=True)
    assert graphed.runner.use_cuda_graph and not eager.runner.use_cuda_graph
    # Two short prompts of different lengths (28 and 55 tokens: one bucket), the long one (93: the next
    # bucket), then the first again.
    calls = [["a red fox"], ["a lighthouse on a cliff at dusk, oil"], [PROMPTS[2]], ["a red fox"]]
    graphs_after = []
    for prompts in calls:
        got = [f.clone() for f in graphed.encode(prompts, MAX)]
        want = eager.encode(prompts, MAX)
        assert [g.shape for g in got] == [w.shape for w in want]
        for g, w in zip(got, want, strict=True):
            # fp32 on CUDA (no TF32 by default): rounding-order noise only, O(1) for a leak of padding.
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
        graphs_after.append(len(graphed.runner._graphs))
    assert graphs_after == [1, 1, 2, 2]  # same bucket, same graph; a longer prompt adds one
    assert sorted(key[0] for key in graphed.runner._graphs) == [(1, 64), (1, 128)]


def test_warm_up_runs_every_bucket_once_per_batch_size(parts, monkeypatch):
    assert prompt_encoder(parts).warm_up(MAX) == []  # no graphs (CPU): nothing is kept, nothing to warm
    graphed = prompt_encoder(parts)
    monkeypatch.setattr(graphed.runner, "use_cuda_graph", True)
    seen = []
    monkeypatch.setattr(graphed.runner, "hidden_states", lambda ids, mask: seen.append((tuple(ids.shape), mask.sum(1).tolist())))
    shapes = graphed.warm_up(MAX, batch_sizes=(1, 2))
    assert shapes == [(b, n) for b in (1, 2) for n in range(64, MAX + 1, 64)]
    assert [s for s, _ in seen] == shapes
    assert all(counts == [n - 1] * b for ((b, n), counts) in seen)  # the one pad token encode() keeps
    # every length encode() can ask for is among them
    for real in (1, 40, 63, 64, 200, 511, 700):
        assert graphed.padded_length([real], MAX) in {n for _, n in shapes}
    full = prompt_encoder(parts, pad_to_max_length=True)
    monkeypatch.setattr(full.runner, "use_cuda_graph", True)
    monkeypatch.setattr(full.runner, "hidden_states", lambda ids, mask: None)
    assert full.warm_up(MAX) == [(1, MAX)]


@pytest.mark.gpu
def test_after_warm_up_no_prompt_captures_a_graph():
    cuda = torch.device("cuda")
    parts = make_tiny_components(seed=0)
    parts["text_encoder"].to(cuda)
    encoder = PromptEncoder(parts["text_encoder"], parts["tokenizer"], cuda)
    assert len(encoder.warm_up(MAX)) == MAX // PROMPT_BUCKET
    captured = dict(encoder.runner._graphs)
    for prompts in (["a red fox"], [PROMPTS[2]], ["x " * 300]):
        encoder.encode(prompts, MAX)
    assert encoder.runner._graphs.keys() == captured.keys()

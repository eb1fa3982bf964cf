"""The text encoder's forward, replayed from a CUDA graph per input shape.

Qwen3-4B on a 512-token prompt is a few ms of GPU work, but eager PyTorch launches ~500 kernels for
it and the GPU waits on Python; replayed from a graph it runs at the GPU's pace, and steadier, with
bitwise the same features (bench/stage_probe.py; figures in BENCHMARKS.md). diffusers pads every
prompt to 512 tokens; we run the encoder on the prompt's own tokens rounded up to a bucket of
`PROMPT_BUCKET` tokens, so a few graphs (one per bucket and batch size) serve every prompt and a
typical 20-150-token prompt costs a fraction of 512 tokens' work (`PromptEncoder.padded_length`).

transformers builds the attention mask with host-side checks, except while a CUDA stream is being
captured (`is_tracing` covers capture), when it always builds the explicit mask: the same mask it
builds eagerly for a padded prompt, hence the same kernels and bitwise equal features.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch

from ..errors import NonFiniteOutputError, PromptTruncatedWarning
from .graph_capture import recover_after_failed_capture

# Prompts run on their tokens rounded up to a multiple of this (on a GPU with CUDA graphs), so
# max_sequence_length=512 makes 8 shapes per batch size, each captured once. 64: a multiple of the
# matmul and attention kernels' tiles (shorter tails waste tensor-core work anyway), at most 63 pad
# tokens of extra work, and few enough buckets that capturing them all stays cheap.
PROMPT_BUCKET = 64

# Distinct (batch, tokens) shapes kept captured; the least recently used is dropped past this. 32 =
# the 8 buckets of 512 tokens for batch 1 to 4 (positive and negative prompts are encoded in separate
# calls whose batch is the number of distinct prompts), so bucketed prompts never evict each other.
# All graphs share one memory pool: an extra graph keeps its output [B, L, F] and its kernel list,
# not another set of activations.
MAX_GRAPHS = 32


class TextEncoderRunner:
    """`hidden_states(input_ids, mask)` -> the encoder's second-to-last hidden states [B, L, F].

    On CUDA with `use_cuda_graph`, each (batch, length) is run once eagerly (lazy initialisation),
    captured, then replayed. The returned tensor is the graph's static output: it is overwritten by
    the next replay, so callers copy what they keep before calling again (the pipeline does, under its
    lock). A capture that fails turns graphs off with a warning; the eager path always works.
    """

    def __init__(self, text_encoder, device: torch.device, use_cuda_graph: bool = True):
        self.text_encoder = text_encoder
        self.device = device
        self.use_cuda_graph = bool(use_cuda_graph and device.type == "cuda")
        self._graphs: OrderedDict[tuple, tuple] = OrderedDict()
        # One memory pool for all captured shapes: graphs replay one at a time and each output is
        # consumed before the next replay, so their activations may share memory.
        self._pool = None

    def eager(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.text_encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        return out.hidden_states[-2]

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self.use_cuda_graph:
            return self.eager(input_ids, mask)
        key = (tuple(input_ids.shape), input_ids.dtype, mask.dtype)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(input_ids, mask)
            if entry is None:
                return self.eager(input_ids, mask)
            self._graphs[key] = entry
            while len(self._graphs) > MAX_GRAPHS:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        graph, static_ids, static_mask, static_out = entry
        static_ids.copy_(input_ids)
        static_mask.copy_(mask)
        graph.replay()
        return static_out

    def _capture(self, input_ids: torch.Tensor, mask: torch.Tensor):
        static_ids, static_mask = input_ids.clone(), mask.clone()
        # Lazy initialisation (cuBLAS handles, workspaces) must happen outside the capture.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.eager(static_ids, static_mask)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                static_out = self.eager(static_ids, static_mask)
        except torch.OutOfMemoryError:
            recover_after_failed_capture(self.device, graph)
            raise  # the pipeline's out-of-memory handling takes it from here; graphs stay on
        except Exception as error:  # a model with host syncs in its forward cannot be captured
            recover_after_failed_capture(self.device, graph)
            self.use_cuda_graph = False
            self._graphs.clear()
            warnings.warn(f"the text encoder cannot run in a CUDA graph ({type(error).__name__}: {error}); "
                          "running it eagerly", stacklevel=3)
            return None
        return graph, static_ids, static_mask, static_out

    def clear(self) -> int:
        """Drop every captured graph (after an out-of-memory error, say); returns how many."""
        count = len(self._graphs)
        self._graphs.clear()
        return count


class PromptEncoder:
    """Prompts -> caption features as diffusers' `ZImagePipeline.encode_prompt` makes them: the
    tokenizer's chat template (`enable_thinking=True`), right padding, the encoder's `hidden_states[-2]`,
    and only the real (unmasked) tokens kept.

    By default the encoder runs on the real tokens plus one pad token, rounded up to `PROMPT_BUCKET`
    where CUDA graphs replay it: equal features up to rounding, far less work than diffusers' 512
    (see `padded_length`). `pad_to_max_length=True` pads to `max_sequence_length` as diffusers does
    (bitwise its features).
    """

    def __init__(self, text_encoder, tokenizer, device: torch.device, *, use_cuda_graph: bool = True,
                 pad_to_max_length: bool = False):
        self.tokenizer = tokenizer
        self.device = device
        self.pad_to_max_length = pad_to_max_length
        # diffusers truncates silently; we say so once per pipeline, not on every call of a loop.
        self.truncation_warned = False
        self.runner = TextEncoderRunner(text_encoder, device, use_cuda_graph)

    @torch.no_grad()
    def encode(self, prompts: list[str], max_sequence_length: int) -> list[torch.Tensor]:
        """One [L_i, F] tensor per prompt (copies: the runner's graph output is reused by the next call)."""
        texts = [self.chat_text(p) for p in prompts]
        lengths = self.token_counts(texts)
        if not self.truncation_warned:
            side = getattr(self.tokenizer, "truncation_side", "right")
            self.truncation_warned = _warn_if_truncated(lengths, max_sequence_length, side)
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.padded_length(lengths, max_sequence_length),
            truncation=True,
            return_tensors="pt",
        )
        input_ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device).bool()
        hidden = self.runner.hidden_states(input_ids, mask)
        if not torch.isfinite(hidden[mask]).all():
            raise NonFiniteOutputError(
                f"the text encoder produced NaN/inf features ({hidden.dtype}); run it in bfloat16 or float32"
            )
        return [hidden[i][mask[i]] for i in range(len(texts))]

    def chat_text(self, prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=True
        )

    def token_counts(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(texts, truncation=False, verbose=False).input_ids]

    @torch.no_grad()
    def warm_up(self, max_sequence_length: int, batch_sizes=(1,)) -> list[tuple[int, int]]:
        """Run (and so capture) every encoder shape `encode` can ask for: each prompt-length bucket up to
        `max_sequence_length`, per batch size. A service does this before it reports ready, so that no
        request pays a capture (~0.2 s at full size). Returns the (batch, tokens) shapes run; none when
        graphs are off (then nothing is kept between calls)."""
        if not self.runner.use_cuda_graph:
            return []
        # every padded_length() result: the bucket ends, and the cap itself
        lengths = sorted({self.padded_length([real], max_sequence_length)
                          for real in range(0, max_sequence_length + 1, PROMPT_BUCKET)})
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        shapes = []
        for batch in batch_sizes:
            for length in lengths:
                ids = torch.full((batch, length), pad_id, dtype=torch.long, device=self.device)
                mask = torch.ones(batch, length, dtype=torch.bool, device=self.device)
                mask[:, -1] = False  # the one pad token encode() always keeps
                self.runner.hidden_states(ids, mask)
                shapes.append((batch, length))
        return shapes

    def padded_length(self, lengths: list[int], max_sequence_length: int) -> int:
        """How many tokens to run the encoder on (real tokens are always the first ones: right padding).

        With causal attention, padding never reaches the real tokens, so fewer pad tokens leave their
        features mathematically unchanged; numerically, kernels chosen by sequence length may round
        differently (equal within rounding, not bitwise). One pad token is always kept: with none,
        transformers drops the mask and SDPA's causal kernel rounds differently again. Where CUDA
        graphs replay the encoder the length is rounded up to `PROMPT_BUCKET`, so a handful of captured
        shapes serve every prompt; elsewhere (CPU, graphs off) nothing is gained by rounding.
        `pad_to_max_length` keeps diffusers' full padding (bitwise its features). Left padding would
        shift the real tokens' positions, so it always keeps the full padding.
        """
        if self.pad_to_max_length or getattr(self.tokenizer, "padding_side", "right") != "right":
            return max_sequence_length
        bucket = PROMPT_BUCKET if self.runner.use_cuda_graph else 1
        return encoder_length(lengths, max_sequence_length, bucket)


def encoder_length(lengths: list[int], max_sequence_length: int, bucket: int = 1) -> int:
    """The longest prompt's tokens plus one pad token, rounded up to a multiple of `bucket`, at most
    `max_sequence_length` (a prompt that long or longer is cut there, as diffusers cuts it)."""
    if bucket < 1:
        raise ValueError(f"bucket must be a positive number of tokens, got {bucket}")
    needed = max(lengths) + 1
    return min(max_sequence_length, -(-needed // bucket) * bucket)


def _warn_if_truncated(lengths: list[int], max_sequence_length: int, side: str) -> bool:
    """Warns about the first prompt that is cut short, if any; returns whether it warned."""
    end = "first" if side == "left" else "last"
    for i, length in enumerate(lengths):
        if length > max_sequence_length:
            warnings.warn(
                f"prompt {i} is {length} tokens long (chat template included) but max_sequence_length="
                f"{max_sequence_length}: the {end} {length - max_sequence_length} tokens were dropped "
                f"(said once per pipeline; later prompts are cut silently, as diffusers does)",
                PromptTruncatedWarning,
                stacklevel=3,
            )
            return True
    return False

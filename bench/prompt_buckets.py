"""Text stage at full size (Qwen3-4B, random weights, one GPU): prompts padded to 512 tokens as diffusers
does vs the default (real tokens + 1 pad, rounded up to 64-token buckets, one CUDA graph per bucket).

Times `PromptEncoder.encode` (chat template, tokenizer, graph replay, the copies the pipeline keeps),
per prompt length, after its graph is captured (the first call, capture included, is printed apart:
what the first prompt of a new bucket pays); prints how many graphs each setting captured and the
bucketed features' largest difference from the 512-padded ones (relative to their largest value).

    python bench/prompt_buckets.py [--precision bf16|fp16] [--fp8]

About 1-2 minutes on an H100 (building the random 4B model included).
"""

import argparse
import time

import torch

from zimage_trt.benchmark.common import PROMPT_160, cuda_time_ms, environment, format_row, full_size_text_encoder
from zimage_trt.runtime.telemetry import summarize
from zimage_trt.runtime.text_encoder import PromptEncoder
from zimage_trt.testing.tiny import make_tiny_tokenizer

# Tiny byte-level tokenizer + chat template: 40, 69, 178 (PROMPT_160, the `zimage-trt bench` prompt)
# and 339 tokens: buckets of 64, 128, 192 and 384 tokens.
PROMPTS = {
    "short": "a red fox in the snow",
    "medium": "a red fox in fresh snow at dawn, soft golden light",
    "bench": PROMPT_160,
    "long": PROMPT_160 + ", " + PROMPT_160,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16"], help="text encoder dtype")
    ap.add_argument("--fp8", action="store_true", help="FP8 text encoder (model/fp8.py; needs bf16)")
    ap.add_argument("--iters", type=int, default=20, help="timed calls per prompt and setting")
    args = ap.parse_args()
    print(environment(), flush=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    cuda = torch.device("cuda")
    te = full_size_text_encoder("cuda", dtype)
    if args.fp8:
        from zimage_trt.model.fp8 import quantize_text_encoder_fp8

        quantize_text_encoder_fp8(te)
    tokenizer = make_tiny_tokenizer()
    encoders = {"padded to 512": PromptEncoder(te, tokenizer, cuda, pad_to_max_length=True),
                "bucketed (default)": PromptEncoder(te, tokenizer, cuda)}
    with torch.no_grad():
        for label, text in PROMPTS.items():
            default = encoders["bucketed (default)"]
            tokens = default.token_counts([default.chat_text(text)])[0]
            print(f"\nprompt {label}: {tokens} tokens, the default runs {default.padded_length([tokens], 512)}",
                  flush=True)
            features = {}
            baseline = None
            for name, encoder in encoders.items():
                torch.cuda.synchronize()
                started = time.perf_counter()
                features[name] = [f.clone() for f in encoder.encode([text], 512)]
                torch.cuda.synchronize()
                # A new shape's first call: one eager run + the capture (what a first prompt in a bucket pays).
                print(f"  {name}: first call {1000 * (time.perf_counter() - started):.1f} ms", flush=True)
                stats = summarize(cuda_time_ms(lambda e=encoder: e.encode([text], 512), iters=args.iters))
                print(format_row(f"  {name}", stats, baseline), flush=True)
                baseline = baseline or stats["mean"]
            want, got = features["padded to 512"][0].float(), features["bucketed (default)"][0].float()
            rel = ((got - want).abs().max() / want.abs().max()).item()
            print(f"  features: max |bucketed - 512| / max |512| = {rel:.2e} over {tokens} tokens", flush=True)
    for name, encoder in encoders.items():
        print(f"graphs captured, {name}: {len(encoder.runner._graphs)}", flush=True)


if __name__ == "__main__":
    main()

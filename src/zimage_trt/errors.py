"""Errors and warnings a generation can raise, shared by the runtime and the pipeline.

(Engine selection has `EngineNotFound`, the build `WeightsError` and the TensorRT errors: each lives
beside the code that raises it.)
"""


class NonFiniteOutputError(RuntimeError):
    """The generated latents or decoded pixels hold NaN or inf (typically fp16 overflow)."""


class GenerationOOMError(RuntimeError):
    """The device ran out of memory during a generation (`__cause__` is the original error).

    The request's buffers, captured graphs and intermediates were released; the pipeline stays usable.
    Retry with a smaller size or fewer images per call.
    """


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than `max_sequence_length`; the tail was dropped (diffusers does it silently)."""

"""Quiet by default: third-party notices and progress bars that tell a truthgpt user nothing.

Each is silenced where the call that makes it is, never globally: a warning we did not foresee
still reaches the user.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

# transformers 5 logs "`CLIPImageProcessor` requires torchvision (not installed); falling back to
# `CLIPImageProcessorPil`" once per class when diffusers touches its image processors; the PIL
# fallback is what Stable Diffusion pipelines use anyway.
TORCHVISION_NOTICE = "requires torchvision (not installed)"
# diffusers checks a loaded pipeline's parts against the annotations of its class: IFPipeline
# says T5EncoderModel, and the pixel-space runs of task image-generation save IF layouts with a
# small CLIPTextModel (training/diffusion_model.py), which IFPipeline runs as well.
IF_CLIP_NOTICE = "Expected types for text_encoder: (<class 'transformers.models.t5."
# peft reads transformers' deprecated `is_gradient_checkpointing` on every wrap (peft's to fix).
PEFT_CHECKPOINTING_NOTICE = r"`is_gradient_checkpointing` is deprecated"
# numpy 2 on the tensors diffusers' schedulers hand to np.array (diffusers' to fix, harmless).
NUMPY_COPY_NOTICE = r"__array__ implementation doesn't accept a copy keyword"
# diffusers' load_lora_weights on an adapter of the UNet alone (ours, and most others): "No LoRA
# keys associated to CLIPTextModel found ... open an issue"; and its log of a failed load, whose
# exception the caller reports anyway.
LORA_LOAD_NOTICES = {
    "diffusers.loaders.lora_base": "No LoRA keys associated to",
    "diffusers.loaders.peft": "was unsuccessful with the following error",
}


class _DropContaining(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def drop_torchvision_notices() -> None:
    """Drop transformers' torchvision fallback notices (idempotent; other messages pass)."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropContaining) for f in logger.filters):
        logger.addFilter(_DropContaining(TORCHVISION_NOTICE))


def drop_if_clip_notices() -> None:
    """Drop diffusers' `Expected types for text_encoder: (T5EncoderModel,), got CLIPTextModel`
    for IF-layout pipelines with a CLIP text encoder (idempotent; other type notices pass)."""
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    if not any(isinstance(f, _DropIfClip) for f in logger.filters):
        logger.addFilter(_DropIfClip(IF_CLIP_NOTICE))


class _DropIfClip(_DropContaining):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (self.text in message and "CLIPTextModel" in message)


@contextlib.contextmanager
def no_load_save_bars() -> Iterator[None]:
    """No `Loading weights` / `Writing model shards` / `Loading pipeline components` bars from
    transformers and diffusers for a local load or save that takes a moment; restored after."""
    import transformers.utils.logging as transformers_logging

    restore = []
    if transformers_logging.is_progress_bar_enabled():
        transformers_logging.disable_progress_bar()
        restore.append(transformers_logging.enable_progress_bar)
    with contextlib.suppress(ImportError):
        import diffusers.utils.logging as diffusers_logging

        if diffusers_logging.is_progress_bar_enabled():
            diffusers_logging.disable_progress_bar()
            restore.append(diffusers_logging.enable_progress_bar)
    try:
        yield
    finally:
        for enable in restore:
            enable()


@contextlib.contextmanager
def no_lora_load_notices() -> Iterator[None]:
    """Drop diffusers' text-encoder and failed-load notices of `load_lora_weights`; restored
    after (other messages of those loggers pass)."""
    added = []
    for name, text in LORA_LOAD_NOTICES.items():
        drop = _DropContaining(text)
        logging.getLogger(name).addFilter(drop)
        added.append((logging.getLogger(name), drop))
    try:
        yield
    finally:
        for logger, drop in added:
            logger.removeFilter(drop)


@contextlib.contextmanager
def no_peft_checkpointing_notices() -> Iterator[None]:
    """Ignore transformers' FutureWarning about `is_gradient_checkpointing`, which peft reads."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_CHECKPOINTING_NOTICE, category=FutureWarning)
        yield


@contextlib.contextmanager
def no_numpy_copy_notices() -> Iterator[None]:
    """Ignore numpy 2's `__array__ ... copy keyword` DeprecationWarning (diffusers' schedulers)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NUMPY_COPY_NOTICE, category=DeprecationWarning)
        yield

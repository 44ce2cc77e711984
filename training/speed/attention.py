"""The UNet's attention kernel (``model.attention``) and gradient checkpointing (``model.gradient_checkpointing``).

Both are set explicitly on every run, in both directions: a worker reuses its loaded base model across
trials, so a trial that turns checkpointing off must undo what the previous trial turned on.
"""

from __future__ import annotations

from typing import Any

import torch

from training.speed.attention_options import attention_problem


def configure_attention(unet: Any, kind: str, device: torch.device | str) -> None:
    """Set every attention layer of ``unet`` to the ``kind`` kernel.

    sdpa: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels inside).
    eager: the plain softmax(QK^T)V reference implementation, for debugging and exact comparisons.
    xformers: ``xformers.ops.memory_efficient_attention`` (Lefaudeux et al., xFormers), CUDA only.
    """
    cuda_available = torch.device(device).type == "cuda" and torch.cuda.is_available()
    if problem := attention_problem(kind, cuda_available):
        raise RuntimeError(problem)
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0  # attention_problem stays light

    if kind == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    elif kind == "eager":
        unet.set_attn_processor(AttnProcessor())
    else:
        unet.set_attn_processor(AttnProcessor2_0())


def configure_gradient_checkpointing(
    unet: Any, text_encoders: list[Any], *, enabled: bool, train_text_encoder: bool
) -> None:
    """Recompute activations in backward instead of storing them (Chen et al. 2016, arXiv:1604.06174).

    The UNet is checkpointed whenever ``enabled``: even when only the text encoder trains, gradients
    flow back through the UNet. The text encoder is checkpointed only when it trains (it runs under
    no_grad otherwise, so there is nothing to save). Non-reentrant checkpointing keeps gradients
    flowing to LoRA weights when the frozen inputs do not require grad.
    """
    if enabled:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    for text_encoder in text_encoders:
        if enabled and train_text_encoder:
            _text_encoder_checkpointing(text_encoder, True)
        elif gradient_checkpointing_enabled(text_encoder):
            _text_encoder_checkpointing(text_encoder, False)


def _text_encoder_checkpointing(text_encoder: Any, enabled: bool) -> None:
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_* (old names warn).
    if enabled:
        enable = getattr(text_encoder, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    disable = (
        getattr(text_encoder, "activation_checkpointing_disable", None) or text_encoder.gradient_checkpointing_disable
    )
    disable()
    # enable() may have hooked the input embeddings to require grad; take that off again too.
    if hasattr(text_encoder, "disable_input_require_grads"):
        text_encoder.disable_input_require_grads()


def gradient_checkpointing_enabled(model: Any) -> bool:
    """Whether any submodule of ``model`` (UNet or text encoder) recomputes its activations."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def configure_memory_format(unet: Any, channels_last: bool) -> None:
    """Channels-last (NHWC) conv weights, or back to contiguous (NCHW).

    On a GPU cuDNN's fastest convolutions are NHWC: with NCHW weights every convolution first
    transposes its input (~200 extra kernels per SD1.5 step). Applied on every run in both
    directions, since a worker reuses its base model across trials.
    """
    unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

"""Will an augmentation job fit on this worker? A rough upper estimate, checked before training
so that a job that cannot fit fails at once, naming the setting to lower, instead of running out
of memory hours in."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kd_engine.errors import SpecError

FLOAT_BYTES = 4
ADAM_BYTES_PER_PARAM = 3 * FLOAT_BYTES
"""A trained float32 parameter's gradient and AdamW's two moments."""
ACTIVATION_FLOATS_PER_TOKEN_LAYER = 34
"""float32 activations a transformer layer keeps per token and hidden unit for the backward
pass (attention, feed-forward with its 4d inner layer, LayerNorms, dropout masks): an upper
estimate, rounded up from Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models", section 4.1: 34 s b h bytes per layer in 16-bit, with s b h the
tokens times the width; attention scores excluded)."""


@dataclass(frozen=True)
class ModelCost:
    """What one model adds to a step.

    Attributes:
        parameters: number of parameters.
        trained: whether an optimiser updates them (gradients and AdamW moments).
        hidden_size, num_layers: width d and depth L (activation memory per token).
        backward: whether a backward pass runs through the model (activations kept).
    """

    parameters: int
    trained: bool
    hidden_size: int
    num_layers: int
    backward: bool


def estimate_bytes(
    models: list[ModelCost], batch_size: int, seq_length: int, vocab_size: int, copies: int
) -> int:
    """Upper estimate of the bytes a generator step and a student step need at once.

    Weights (float32) of every model, gradients and AdamW state of the trained ones, the
    activations of every model a backward pass runs through, ``copies`` times (the original and
    the augmented batch), and the generator's vocabulary tensors: logits, log-softmax and
    Gumbel-softmax of shape (B, T, V), float32.

    Args:
        models: teacher, student and generator costs.
        batch_size: B, examples per micro-batch.
        seq_length: T, tokens per example (the padded maximum).
        vocab_size: V.
        copies: batches each model reads per step (2: x and x').

    Returns:
        Bytes.
    """
    tokens = batch_size * seq_length
    total = 0
    for m in models:
        total += m.parameters * FLOAT_BYTES
        if m.trained:
            total += m.parameters * ADAM_BYTES_PER_PARAM
        if m.backward:
            total += (
                copies
                * tokens
                * m.hidden_size
                * m.num_layers
                * ACTIVATION_FLOATS_PER_TOKEN_LAYER
                * FLOAT_BYTES
                // 2
            )
    total += 3 * tokens * vocab_size * FLOAT_BYTES
    return total


def available_bytes(device: torch.device) -> int:
    """Free memory of ``device`` in bytes: the GPU's free memory, or the machine's available
    physical memory for the CPU (Linux ``/proc/meminfo`` MemAvailable, else free pages)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))


def check_fits(needed: int, available: int, method: str) -> None:
    """Raise unless ``needed`` bytes fit in ``available``.

    Raises:
        SpecError: ``training.batch_size``, saying how much is needed and free and which
            settings lower it.
    """
    if needed <= available:
        return
    gib = 1024**3
    raise SpecError(
        "training.batch_size",
        f"{method} needs about {needed / gib:.1f} GiB for the teacher, student and generator "
        f"together and this worker has {available / gib:.1f} GiB free; lower "
        "training.batch_size (and training.grad_accumulation_steps keeps the effective batch), "
        "training.max_seq_length or method.generator_layers, or use a generator checkpoint "
        "with fewer parameters",
    )

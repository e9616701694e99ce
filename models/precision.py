"""The arithmetic precision of local training (``[agent] precision``); torch-free, so configs can name it."""

from __future__ import annotations

import enum

__all__ = ["Precision"]


class Precision(enum.Enum):
    """The arithmetic of non-private local training's forward pass and loss (``[agent] precision``).

    DP-SGD always runs in float32: its per-sample gradients and clipping are not tested under
    autocast. Weights, optimiser state and gradients stay float32 either way.
    """

    FP32 = "fp32"
    BF16 = "bf16"  # torch.autocast to bfloat16 (CUDA with bf16 support, or the CPU); no loss scaling needed

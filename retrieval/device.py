"""The torch device a `--device` option names: one rule for finetune, index, query and serve."""

from __future__ import annotations

import torch

from .errors import RetrievalError


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' -> cuda when available else cpu; an explicit cuda without a GPU is an error."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RetrievalError(f"device {str(name)!r} requested but CUDA is not available; use --device cpu")
    return device

"""Every use of a dependency's private API, in one place (tests/test_compat.py fails loudly when one changes).

Each function below wraps one private name that has no public equivalent for what the project needs; the
rest of the code calls these functions, never the private names. Imports stay inside the functions, so this
module costs nothing to import.

    vision_tower          open_clip.model._build_vision_tower: the image tower alone (create_model builds the
                          text tower too, and cannot skip timm's weight download flag per tower)
    tensor_version        Tensor._version: the in-place write counter (no public accessor), for a cheap cache key
    cpu_has_bf16          torch.ops.mkldnn._is_mkldnn_bf16_supported: native bf16 on this CPU (AVX512-BF16 / AMX)
    loader_workers        a DataLoader iterator's `_workers` and `_shutdown_workers`: which decode worker died,
    shutdown_loader       and stopping the rest (the public API only raises "worker exited unexpectedly")
    parse_multipart       starlette's MultiPartParser over a byte-capped stream (Request.form() reads the whole
                          body with no cap on its size)
    ray_init_private      ray.init(_system_config=...): settings of a Ray this process starts itself
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


def vision_tower(embed_dim: int, vision_cfg: dict, quick_gelu: bool) -> nn.Module:
    """open_clip's own image-tower builder (the one CLIP and CustomTextCLIP call)."""
    from open_clip.model import _build_vision_tower

    tower: nn.Module = _build_vision_tower(embed_dim, vision_cfg, quick_gelu)
    return tower


def tensor_version(tensor: torch.Tensor) -> int:
    """torch's version counter of a tensor: bumped by every in-place write through autograd-visible ops."""
    return int(tensor._version)


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def loader_workers(batches: Iterator[object]) -> list:
    """The worker processes (multiprocessing.Process) of a DataLoader iterator; [] with no workers."""
    return list(getattr(batches, "_workers", []))


def shutdown_loader(batches: Iterator[object]) -> None:
    """Stop a DataLoader iterator's remaining workers (and unregister them from torch's SIGCHLD check)."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


async def parse_multipart(headers: Any, stream: AsyncGenerator[bytes, None], *, max_files: int, max_fields: int) -> Any:
    """A starlette FormData parsed from `stream` (which may stop itself by raising) with the request's
    `headers`; starlette's MultiPartException on a malformed body."""
    from starlette.formparsers import MultiPartParser

    return await MultiPartParser(headers, stream, max_files=max_files, max_fields=max_fields).parse()


def ray_init_private(system_config: dict[str, Any]) -> dict[str, Any]:
    """The ray.init keyword arguments that set a started Ray's internal settings."""
    return {"_system_config": system_config}

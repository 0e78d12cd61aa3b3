"""The Encoder module: an open_clip image tower, a linear head, L2 normalisation, and its preprocessing."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterator
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from retrieval.compat import tensor_version, vision_tower
from retrieval.encoder.config import EncoderConfig
from retrieval.errors import EncoderError
from retrieval.hashing import splitmix64

Transform = Callable[[Image.Image], torch.Tensor]
_INIT_SEED = 0   # fixed: the same spec always builds the same initial tower (and fingerprint)


class Encoder(nn.Module):
    """Images (N, 3, S, S) -> float32 L2-normalised embeddings (N, embed_dim), whatever the module dtype.

    `spec` rebuilds it: `load_encoder(enc.spec, embed_dim=enc.embed_dim)`; `origin` says where the
    weights first came from (package, tag or file).
    """

    def __init__(self, config: EncoderConfig, visual: nn.Module, head: nn.Linear, *, spec: str, origin: str):
        super().__init__()
        self.config = config
        self.visual = visual
        self.head = head
        self.spec = spec
        self.origin = origin
        self._fingerprint_cache: tuple[tuple, str] | None = None   # (what it was computed from, value)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def tower_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled tower output (N, feature_dim) in float32, before the head: the pretrained geometry."""
        return self.visual(images.to(self.head.weight.dtype)).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings; in eval mode with config.tta "flip", normalise(f(x) + f(x mirrored left-right)), where
        f is the plain embedding (twice the encoder work). Training (train mode) never averages."""
        out = self._embed(images)
        if self.config.tta == "flip" and not self.training:
            out = F.normalize(out + self._embed(images.flip(-1)), dim=-1)
        return out

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        features = self.visual(images.to(self.head.weight.dtype))
        return F.normalize(self.head(features).float(), dim=-1)

    def eval_transform(self) -> Transform:
        return eval_transform(self.config)

    def train_transform(self) -> Transform:
        return train_transform(self.config)

    @torch.no_grad()
    def init_head_from_features(self, features: torch.Tensor) -> float:
        """Set the head to the top `embed_dim` (uncentred) principal directions of these tower features;
        return the share of their (L2-normalised) energy the head keeps.

        Of all projections to `embed_dim` with orthonormal rows this one keeps the inner products of the
        given features best (Eckart-Young); rows beyond their rank complete an orthonormal basis. A head
        at least as wide as the tower is already an exact isometry and is left alone.
        """
        if self.embed_dim >= self.config.feature_dim:
            return 1.0
        unit = F.normalize(features.detach().float().cpu(), dim=-1)
        _, singular, vh = torch.linalg.svd(unit, full_matrices=True)
        self.head.weight.copy_(vh[: self.embed_dim].to(self.head.weight))
        energy = singular.square()
        return float(energy[: self.embed_dim].sum() / energy.sum())

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.visual.parameters()

    def layer_groups(self) -> int | None:
        """How many layer groups open_clip's `lock` sees in the tower (timm: stem, one per block, head; ViT:
        stem, one per residual block, ln_post + proj), or None when it cannot lock the tower in part."""
        trunk = getattr(self.visual, "trunk", None)
        if trunk is not None and hasattr(trunk, "group_matcher"):
            from timm.models import group_parameters

            return len(group_parameters(trunk, trunk.group_matcher()))
        blocks = getattr(getattr(self.visual, "transformer", None), "resblocks", None)
        return len(blocks) + 2 if blocks is not None and hasattr(self.visual, "lock") else None

    def lock_tower(self, locked_groups: int) -> None:
        """Freeze the tower's first `locked_groups` layer groups with open_clip's own `lock` (the grouping of
        its `--lock-image-unlocked-groups`). Frozen leading layers build no autograd graph: less memory and
        time per step, and the generic low-level features stay as pretrained."""
        groups = self.layer_groups()
        if groups is None:
            raise EncoderError(f"open_clip cannot lock {type(self.visual).__name__} towers in part; "
                               f"pass --locked-groups 0")
        with warnings.catch_warnings():   # open_clip imports timm's grouping helpers from a deprecated path
            warnings.simplefilter("ignore", FutureWarning)
            lock = cast("Callable[..., None]", self.visual.lock)   # nn.Module's __getattr__ types it as a tensor
            lock(unlocked_groups=max(groups - locked_groups, 0), freeze_bn_stats=False)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return self.head.parameters()

    def fingerprint(self) -> str:
        """sha256 hex of the canonical config JSON and every state tensor (name, dtype, shape, bytes).

        Cached until the config or a tensor is replaced, or a tensor is modified in place (torch bumps its
        version counter; writes through `.data` bypass that counter and are not noticed).
        """
        state = self.state_dict(keep_vars=True)
        key = (self.config, *((name, t.data_ptr(), tensor_version(t), t.dtype, t.device) for name, t in state.items()))
        if self._fingerprint_cache is None or self._fingerprint_cache[0] != key:
            self._fingerprint_cache = (key, fingerprint(self.config, state))
        return self._fingerprint_cache[1]


def fingerprint(config: EncoderConfig, state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(config.canonical_json().encode())
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]  # numpy declares the buffer protocol for Python >= 3.12 only
    return digest.hexdigest()


def init_head(feature_dim: int, embed_dim: int) -> nn.Linear:
    """A bias-free projection that keeps the tower's geometry.

    Identity when the widths match. Otherwise each unit of the narrower side takes a disjoint group of units
    of the wider side with +-1 signs, normalised: orthonormal rows (cosines kept approximately, like a random
    orthogonal projection: r = 0.99 for EfficientNet-Lite0 1280 -> 512) or orthonormal columns (kept exactly).
    Groups and signs come from integer hashing, not from an RNG or a QR, so the weights are bit-identical on
    every machine and library version: `load_encoder("lite0")` has one fingerprint everywhere.
    """
    head = nn.Linear(feature_dim, embed_dim, bias=False)
    narrow, wide = sorted((feature_dim, embed_dim))
    weight = torch.zeros(narrow, wide)
    units = np.arange(wide)
    order = np.argsort(splitmix64(units), kind="stable")   # a fixed pseudo-random order of the wide units
    signs = np.where(splitmix64(wide + order) & np.uint64(1), 1.0, -1.0)
    weight[torch.from_numpy(units % narrow), torch.from_numpy(order)] = torch.from_numpy(signs).float()
    weight /= (weight != 0).sum(dim=1, keepdim=True).double().sqrt().float()   # sqrt(group size), exact
    with torch.no_grad():
        head.weight.copy_(torch.eye(embed_dim) if feature_dim == embed_dim
                          else weight if embed_dim < feature_dim else weight.T)
    return head


def build_visual(model_cfg: dict) -> nn.Module:
    """The open_clip image tower for a (reduced) open_clip model config, deterministically initialised.

    Uses open_clip's own tower builder (the one CLIP and CustomTextCLIP call), so no text tower is built.
    """
    vision_cfg = dict(model_cfg["vision_cfg"])
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False   # never download; weights are loaded afterwards
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_INIT_SEED)
        return vision_tower(model_cfg["embed_dim"], vision_cfg, model_cfg.get("quick_gelu", False))


@torch.no_grad()
def tower_output_dim(visual: nn.Module, image_size: int) -> int:
    """Width of the tower output, measured with one blank image (works for every tower type)."""
    was_training = visual.training
    visual.eval()
    width = visual(torch.zeros(1, 3, image_size, image_size)).shape[-1]
    visual.train(was_training)
    return int(width)


def _interpolation(config: EncoderConfig) -> InterpolationMode:
    return InterpolationMode(config.interpolation)


def _normalise(config: EncoderConfig) -> list:
    return [T.ToTensor(), T.Normalize(config.mean, config.std)]


def eval_transform(config: EncoderConfig) -> Transform:
    """Resize the shorter side to `resize_size` and centre-crop (or squash to a square), then normalise."""
    size = config.image_size
    if config.resize_mode == "squash":
        resize = [T.Resize((size, size), interpolation=_interpolation(config))]
    else:
        resize = [T.Resize(config.resize_size, interpolation=_interpolation(config)), T.CenterCrop(size)]
    return T.Compose([*resize, *_normalise(config)])


def train_transform(config: EncoderConfig) -> Transform:
    """Random resized crop (area `train_scale`) + horizontal flip, then normalise."""
    crop = T.RandomResizedCrop(config.image_size, scale=config.train_scale, interpolation=_interpolation(config))
    return T.Compose([crop, T.RandomHorizontalFlip(), *_normalise(config)])

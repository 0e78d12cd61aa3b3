"""EncoderConfig: the architecture and preprocessing of an encoder as data, saved as encoder.json."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from retrieval.errors import EncoderError
from retrieval.eval_config import RESIZE_MODES, TTA_MODES

DEFAULT_EMBED_DIM = 512


@dataclass(frozen=True)
class EncoderConfig:
    """Everything needed to rebuild an encoder and its preprocessing exactly (weights aside).

    `model_cfg` is an open_clip model config reduced to the image side: `embed_dim` (the tower's output
    width), `vision_cfg` and `quick_gelu`; EfficientNet-Lite is expressed the same way (a timm tower).
    """

    model: str                          # "lite0", "lite2" or an open_clip model name
    model_cfg: dict[str, Any] = field(hash=False)
    feature_dim: int                    # width of the tower output = input of the head
    embed_dim: int                      # width of the head output = the embedding
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"       # "shortest": resize shorter side + centre crop; "squash": resize to a square
    crop_pct: float = 1.0               # eval: resize the shorter side to image_size / crop_pct, then centre crop
    train_scale: tuple[float, float] = (0.35, 1.0)   # RandomResizedCrop area range for training
    tta: str = "none"                   # eval: "flip" embeds normalise(f(x) + f(mirrored x)); see Encoder.forward

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise EncoderError(f"resize_mode must be one of {RESIZE_MODES}, not {self.resize_mode!r}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise EncoderError(f"crop_pct must be in (0, 1], not {self.crop_pct}")
        if self.tta not in TTA_MODES:
            raise EncoderError(f"tta must be one of {TTA_MODES}, not {self.tta!r}")

    @property
    def resize_size(self) -> int:
        """Shorter side after the eval resize (before the centre crop); a decoder may draft to it."""
        return round(self.image_size / self.crop_pct)

    def with_eval_resize(self, crop_pct: float | None = None, resize_mode: str | None = None,
                         tta: str | None = None) -> EncoderConfig:
        """This config with another eval resize or test-time augmentation (None keeps the current value): a
        new config, so a new fingerprint, as the embeddings change with it."""
        return replace(self, crop_pct=self.crop_pct if crop_pct is None else crop_pct,
                       resize_mode=self.resize_mode if resize_mode is None else resize_mode,
                       tta=self.tta if tta is None else tta)

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON; `tta` only when not "none", so that an encoder from before it existed keeps
        its fingerprint (and its index DBs stay valid)."""
        data = asdict(self)
        if data["tta"] == "none":
            del data["tta"]
        return data

    def canonical_json(self) -> str:
        """Key-sorted, whitespace-free JSON: the config part of the fingerprint."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EncoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EncoderError(f"encoder config has unknown keys {unknown} (written by a newer version?)")
        missing = [f.name for f in fields(cls)
                   if f.name not in data and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise EncoderError(f"encoder config lacks keys {missing}")
        values = dict(data)
        for name in ("mean", "std", "train_scale"):
            if name in values:
                values[name] = tuple(float(v) for v in values[name])
        return cls(**values)

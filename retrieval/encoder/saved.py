"""Save an encoder to a run directory and load it back: safetensors weights + encoder.json (config, fingerprint).

encoder.json: {"format": 1, "config": EncoderConfig, "weights": "model.safetensors", "fingerprint": sha256 hex,
"origin": where the initial weights came from}. Both files are written atomically and durably (retrieval.files).
"""

from __future__ import annotations

import json
from pathlib import Path

from retrieval.encoder.config import EncoderConfig
from retrieval.encoder.model import Encoder, build_visual, init_head
from retrieval.errors import EncoderError
from retrieval.files import atomic_path, write_text_atomic

ENCODER_JSON = "encoder.json"
FORMAT = 1


def save_encoder(encoder: Encoder, run_dir: Path, *, filename: str = "model.safetensors") -> str:
    """Write the weights and encoder.json into `run_dir`; return the fingerprint."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = encoder.fingerprint()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
    with atomic_path(run_dir / filename) as tmp:
        save_file(tensors, str(tmp), metadata={"fingerprint": fingerprint})
    meta = {"format": FORMAT, "config": encoder.config.to_json(), "weights": filename,
            "fingerprint": fingerprint, "origin": encoder.origin}
    write_text_atomic(run_dir / ENCODER_JSON, json.dumps(meta, indent=2) + "\n")
    return fingerprint


def load_run_dir(run_dir: Path, *, embed_dim: int | None = None) -> Encoder:
    """Rebuild the encoder saved in `run_dir`; its fingerprint must match the one recorded at save time."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta_path = run_dir / ENCODER_JSON
    if not meta_path.is_file():
        raise EncoderError(f"{run_dir}: not an encoder run directory (no {ENCODER_JSON})")
    try:
        meta = json.loads(meta_path.read_text())
        config = EncoderConfig.from_json(meta["config"])
        weights = run_dir / meta["weights"]
        expected = meta["fingerprint"]
    except (ValueError, KeyError, TypeError) as exc:
        raise EncoderError(f"{meta_path}: malformed ({exc})") from exc
    if not weights.resolve().is_relative_to(run_dir.resolve()):
        raise EncoderError(f"{meta_path}: 'weights' must name a file inside the run directory, not {meta['weights']!r}")
    if embed_dim is not None and embed_dim != config.embed_dim:
        raise EncoderError(f"{run_dir} holds a {config.embed_dim}-d encoder, not {embed_dim}-d; drop --embed-dim")
    encoder = Encoder(config, build_visual(config.model_cfg), init_head(config.feature_dim, config.embed_dim),
                      spec=str(run_dir.resolve()), origin=meta.get("origin", ""))
    try:
        state = load_file(str(weights))
        encoder.load_state_dict(state, strict=True)
    except (OSError, SafetensorError, RuntimeError) as exc:
        raise EncoderError(f"{weights}: cannot load weights: {str(exc).splitlines()[0]}") from exc
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        encoder.to(dtypes.pop())   # keep a half-precision save half-precision (same fingerprint)
    if encoder.fingerprint() != expected:
        raise EncoderError(f"{weights}: fingerprint mismatch: the weights changed after {ENCODER_JSON} was written")
    return encoder

"""Image encoders, the "encode" stage of files -> decode -> encode -> LMDB -> FAISS -> search -> query / eval /
serve: an open_clip image tower + a linear head to `embed_dim` + L2 normalisation, returned together with their
preprocessing, saved with their config and a fingerprint.

    encoder = load_encoder("lite0")              # offline ImageNet EfficientNet-Lite0 (the default)
    emb = encoder(encoder.eval_transform()(img).unsqueeze(0))   # (1, 512) float32, unit norm
    fingerprint = save_encoder(encoder, run_dir)  # run_dir is now itself a spec

Spec grammar: see `retrieval.encoder.sources`.
"""

from retrieval.encoder.config import DEFAULT_EMBED_DIM, EncoderConfig
from retrieval.encoder.model import Encoder
from retrieval.encoder.saved import ENCODER_JSON, save_encoder
from retrieval.encoder.sources import SPEC_HELP, legacy_crop_pct, load_encoder

__all__ = ["DEFAULT_EMBED_DIM", "ENCODER_JSON", "SPEC_HELP", "Encoder", "EncoderConfig", "legacy_crop_pct",
           "load_encoder", "save_encoder"]

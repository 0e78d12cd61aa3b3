"""The read side of an index DB that every reader shares: its encoder, embeddings of query images, ranked hits.

`query`, `eval --db` and `serve` all embed a query with the DB's own encoder (checked by fingerprint) and turn
a FAISS row into hits read from LMDB, through these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch and the encoder load only after the DB is found usable
    import torch
    from PIL import Image

    from retrieval.encoder import Encoder
    from retrieval.encoder.engine import Runner

    from .layout import EncoderInfo
    from .search import SearchIndex


@dataclass(frozen=True)
class Hit:
    """One result; `path` is absolute (the indexed folder joined with `relpath`, the path the DB stores)."""

    rank: int
    path: str
    score: float
    label: str
    id: int  # the item's LMDB id (not in `query --json`; serve adds it)
    relpath: str  # relative to the indexed folder: what serve shows a client


def load_db_encoder(index: SearchIndex, *, model: str | None = None, device: str = "auto",
                    tta: str | None = None) -> Encoder:
    """The encoder the DB records (its spec, eval resize and test-time augmentation), or `model` / `tta`
    with the rest of the DB's; IndexStoreError unless its fingerprint is the DB's."""
    from retrieval.device import resolve_device
    from retrieval.encoder import load_encoder

    stored = index.header.encoder
    settings = stored_eval_resize(stored)
    if tta is not None:
        settings["tta"] = tta
    encoder = load_encoder(model or stored.spec, embed_dim=None if model else stored.dim,
                           device=resolve_device(device), **settings)
    index.check_encoder(encoder)
    return encoder


def load_db_runner(index: SearchIndex, encoder: Encoder, *, precision: str | None = None,
                   engine: str | None = None) -> Runner:
    """How queries are embedded: at the DB's recorded precision (with its int8 graph; fp32 on the default engine,
    as torch and onnxruntime fp32 make the same vectors), unless `precision` / `engine` say otherwise; torch fp32
    with a one-line warning when that cannot run here (onnxruntime missing, a tower it cannot take)."""
    from retrieval.encoder.engine import resolve_engine, runner_or_torch

    stored = index.header.encoder
    device = str(next(encoder.parameters()).device)
    spec = resolve_engine(precision or stored.precision, engine, device)  # fp32: the default engine, same vectors
    graph = index.store.db_dir / stored.graph if stored.graph and spec.precision == stored.precision else None
    return runner_or_torch(encoder, spec, device=device, int8_path=graph)[0]


def stored_eval_resize(stored: EncoderInfo) -> dict[str, Any]:
    """`load_encoder`'s crop_pct / resize_mode / tta that rebuild a DB's encoder: the recorded ones, or for a
    DB from before they were recorded the crop its spec then loaded with (retrieval.encoder.legacy_crop_pct)
    and no test-time augmentation."""
    from retrieval.encoder import legacy_crop_pct

    tta = stored.tta or "none"
    if stored.crop_pct is None:
        return {"crop_pct": legacy_crop_pct(stored.spec), "resize_mode": None, "tta": tta}
    return {"crop_pct": stored.crop_pct, "resize_mode": stored.resize_mode, "tta": tta}


def embed_images(encoder: Encoder, images: Sequence[Image.Image], runner: Runner | None = None) -> np.ndarray:
    """(N, dim) float32 embeddings of PIL images with the encoder's eval preprocessing."""
    transform = encoder.eval_transform()
    return embed_tensors(encoder, [transform(im) for im in images], runner)


def embed_tensors(encoder: Encoder, tensors: Sequence[torch.Tensor], runner: Runner | None = None) -> np.ndarray:
    """(N, dim) float32 embeddings of images already preprocessed by `encoder.eval_transform()`, by `runner`
    (see load_db_runner) or the encoder itself in torch."""
    import torch

    device = next(encoder.parameters()).device
    batch = torch.stack(list(tensors)).to(device)
    if runner is not None:
        return runner(batch)
    with torch.inference_mode():
        return encoder(batch).float().cpu().numpy()


def hits_of(index: SearchIndex, scores: np.ndarray, ids: np.ndarray) -> tuple[Hit, ...]:
    """Ranked hits of one query row; padding (-1) is dropped (SearchIndex returns only ids of its snapshot)."""
    keep = ids >= 0
    found = [(item, score) for item, score in zip(index.items(ids[keep]), scores[keep], strict=True) if item]
    return tuple(Hit(rank, str(index.root / item.relpath), float(score), item.label, item.id, item.relpath)
                 for rank, (item, score) in enumerate(found, start=1))

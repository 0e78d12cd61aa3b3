"""embed_records / evaluate_records: batched, multi-worker embedding equals embedding each image on its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.data import load_records
from retrieval.data.decode import load_image
from retrieval.data.generate import GenerateConfig, make_dataset
from retrieval.embed import embed_records, evaluate_records
from retrieval.encoder import load_encoder
from retrieval.errors import RetrievalError
from retrieval.metrics import rank_leave_one_out, ranking_metrics


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = make_dataset(GenerateConfig(out_dir=tmp_path_factory.mktemp("birds"), classes=4, per_class=4, size=48)).root
    return load_records("cub", Path(root))


def test_batched_workers_embedding_matches_one_image_at_a_time(records, tiny_model_spec):
    encoder = load_encoder(tiny_model_spec, embed_dim=16)
    embeddings, labels = embed_records(encoder, records, batch_size=5, workers=2)   # a ragged last batch

    transform = encoder.eval_transform()
    with torch.no_grad():
        expected = [encoder(transform(load_image(r.path, draft_size=encoder.config.resize_size).image)[None])[0]
                    for r in records]
    np.testing.assert_allclose(embeddings, torch.stack(expected).numpy(), rtol=0, atol=1e-5)
    assert labels.tolist() == [r.label for r in records]
    assert embeddings.dtype == np.float32 and embeddings.shape == (len(records), 16)

    result = evaluate_records(encoder, records, batch_size=7)
    queries, _, neighbours = rank_leave_one_out(embeddings, labels, (1, 2, 4, 8))
    expected = ranking_metrics(labels, queries, neighbours, (1, 2, 4, 8))
    assert {k: result.metrics[k] for k in ("recall@1", "map@r")} == pytest.approx(
        {k: expected[k] for k in ("recall@1", "map@r")})
    assert result.metrics["n_queries"] == len(records)
    assert result.to_json() == {**result.metrics, "embed_seconds": result.embed_seconds} and result.embed_seconds > 0


def test_nothing_to_embed_is_an_error(tiny_model_spec):
    with pytest.raises(RetrievalError, match="empty"):
        embed_records(load_encoder(tiny_model_spec), [])

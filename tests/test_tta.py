"""Flip averaging (`--tta flip`) as an encoder setting: the embedding is normalise(f(x) + f(mirrored x)) in eval
mode only, covered by the fingerprint, saved in encoder.json and recorded in the index DB, so index, query, serve
and finetune's evaluation agree; a DB from before it was recorded reads as none."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cli import cli
from tests.index_support import db_state, make_folder


def _invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _direct(plain, x: torch.Tensor) -> np.ndarray:
    """normalise(f(x) + f(flip x)) with the plain encoder f: the formula, computed apart from Encoder.forward."""
    with torch.inference_mode():
        return F.normalize(plain(x) + plain(torch.flip(x, dims=[3])), dim=-1).numpy()


def test_flip_is_the_normalised_sum_of_the_image_and_its_mirror_in_eval_mode_only(tiny_model_spec, tmp_path):
    from retrieval.encoder import load_encoder, save_encoder

    plain, flip = load_encoder(tiny_model_spec), load_encoder(tiny_model_spec, tta="flip")
    x = torch.randn(5, 3, plain.image_size, plain.image_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got, alone = flip(x).numpy(), plain(x).numpy()
    np.testing.assert_allclose(got, _direct(plain, x), atol=1e-6)
    assert np.abs(got - alone).max() > 1e-3   # the mirror changes the embedding of noise
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    flip.train()   # training never averages
    with torch.no_grad():
        np.testing.assert_allclose(flip(x).numpy(), alone, atol=1e-6)
    flip.eval()
    # another encoder (fingerprint); "none" stays out of the config JSON, so encoders from before keep theirs
    assert flip.fingerprint() != plain.fingerprint()
    assert "tta" not in plain.config.to_json() and flip.config.to_json()["tta"] == "flip"
    save_encoder(flip, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "encoder.json").read_text())["config"]["tta"] == "flip"
    again = load_encoder(str(tmp_path / "run"))
    assert again.config.tta == "flip" and again.fingerprint() == flip.fingerprint()
    assert load_encoder(str(tmp_path / "run"), tta="none").fingerprint() == plain.fingerprint()


def test_finetune_evaluation_embeds_with_the_runs_tta(tiny_model_spec, tmp_path):
    from retrieval.data.records import Record
    from retrieval.embed import embed_records
    from retrieval.encoder import load_encoder
    from retrieval.finetune_config import FinetuneConfig
    from retrieval.finetune_setup import build_encoder
    from tests.index_support import write_image

    cfg = FinetuneConfig(out=tmp_path / "out", dataset="folder", model=tiny_model_spec, tta="flip",
                         locked_groups=0, embed_dim=None)
    flip = build_encoder(cfg, torch.device("cpu"))[0]
    assert flip.config.tta == "flip"
    paths = [write_image(tmp_path / f"{i}.png", i) for i in range(3)]
    records = [Record(p, i, f"c{i}", "test") for i, p in enumerate(paths)]
    got, _ = embed_records(flip, records)
    plain = load_encoder(tiny_model_spec, embed_dim=flip.embed_dim)
    plain.load_state_dict(flip.state_dict())
    from PIL import Image

    x = torch.stack([plain.eval_transform()(Image.open(p).convert("RGB")) for p in paths])
    np.testing.assert_allclose(got, _direct(plain, x), atol=1e-5)


def test_index_records_flip_and_query_serve_and_later_runs_use_it(tiny_run_dir, tmp_path):
    from indexer.serve.engine import Engine, ServeConfig
    from indexer.store.lmdb_store import Store
    from indexer.store.search import SearchIndex
    from retrieval.data.decode import load_image
    from retrieval.encoder import load_encoder
    from retrieval.errors import IndexStoreError

    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=2, per_class=3)
    done = _invoke("index", folder, "--db", db, "--model", tiny_run_dir, "--tta", "flip", "--workers", "0")
    assert done.exit_code == 0, done.output
    with Store.open(db) as store:
        assert store.header().encoder.tta == "flip"

    # the stored embedding is the formula on the image decoded as the indexer decodes it
    plain = load_encoder(str(tiny_run_dir))
    image = folder / "class1" / "img002.jpg"
    x = plain.eval_transform()(load_image(image, draft_size=plain.config.resize_size).image)[None]
    np.testing.assert_allclose(db_state(db)["class1/img002.jpg"][1], _direct(plain, x)[0], atol=1e-5)

    # query embeds with the DB's flip (an indexed image finds itself at cosine 1); another tta is one line
    found = _invoke("query", image, "--db", db, "-k", "1", "--json")
    assert found.exit_code == 0, found.output
    assert json.loads(found.output)[0]["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    wrong = _invoke("query", image, "--db", db, "--tta", "none")
    assert wrong.exit_code == 1 and wrong.output.count("\n") == 1
    assert "--tta flip" in wrong.output and "--tta none" in wrong.output

    # serve: the DB's own by default, another one refused
    engine = Engine(ServeConfig(db=db, device="cpu"))
    try:
        assert engine.encoder.config.tta == "flip"
    finally:
        engine.close()
    with pytest.raises(IndexStoreError, match="--tta flip"):
        Engine(ServeConfig(db=db, device="cpu", tta="none"))

    # a later run keeps flip; another tta is another encoder: a new generation beside the live one, then switched
    make_folder(folder, classes=3, per_class=3)
    later = _invoke("index", folder, "--db", db, "--model", tiny_run_dir, "--workers", "0")
    assert later.exit_code == 0, later.output
    np.testing.assert_allclose(db_state(db)["class2/img000.jpg"][1], _direct(plain, plain.eval_transform()(
        load_image(folder / "class2" / "img000.jpg", draft_size=plain.config.resize_size).image)[None])[0],
        atol=1e-5)
    other = _invoke("index", folder, "--db", db, "--model", tiny_run_dir, "--tta", "none", "--workers", "0")
    assert other.exit_code == 0, other.output
    with SearchIndex.open(db) as index:
        assert (index.generation_id, index.header.encoder.tta) == (2, "none")
    with Store.open(db) as store:   # generation 1, in the DB folder itself, is kept as it was (for a rollback)
        assert store.header().encoder.tta == "flip"


def test_a_db_from_before_tta_reads_as_none(tiny_model_spec, tmp_path):
    from indexer.store.layout import EncoderInfo, Header, NewItem
    from indexer.store.lmdb_store import Store
    from indexer.store.read import load_db_encoder
    from indexer.store.search import SearchIndex
    from retrieval.encoder import load_encoder

    old = {"encoder": {"spec": "x", "fingerprint": "f" * 64, "dim": 8, "image_size": 32, "crop_pct": 1.0,
                       "resize_mode": "shortest"}, "root": "/x"}
    assert Header.from_bytes(json.dumps(old).encode()).encoder.tta is None
    encoder = load_encoder(tiny_model_spec)
    info = EncoderInfo(tiny_model_spec, encoder.fingerprint(), encoder.embed_dim, encoder.image_size,
                       encoder.config.crop_pct, encoder.config.resize_mode)   # tta None: as an old DB reads
    with Store.open(tmp_path / "db", readonly=False) as store:
        store.begin_run(info, str(tmp_path))
        vector = np.ones(encoder.embed_dim, np.float32) / np.sqrt(encoder.embed_dim)
        store.commit_batch([NewItem("c/a.jpg", "c", 1, 0, 1, 1, b"\0" * 16, vector)], [])
    with SearchIndex.open(tmp_path / "db", gpu=False) as index:
        loaded = load_db_encoder(index, device="cpu")
        assert loaded.config.tta == "none" and loaded.fingerprint() == encoder.fingerprint()
        with pytest.raises(Exception, match="--tta none"):
            load_db_encoder(index, device="cpu", tta="flip")

"""The eval resize (crop_pct, resize_mode) as an encoder setting: chosen with load_encoder / --crop-pct, covered by
the fingerprint, saved in encoder.json and recorded in the index DB, so index, query and serve agree; DBs and
run directories from before keep the transform they were built with, whatever the shipped default is now."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import cli
from tests.index_support import make_folder


def _invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _header(db: Path):
    from indexer.store.lmdb_store import Store

    with Store.open(db) as store:
        header = store.header()
    assert header is not None
    return header


def test_the_eval_resize_is_part_of_the_config_the_transform_and_the_fingerprint(tiny_model_spec, tmp_path):
    from retrieval.encoder import load_encoder
    from retrieval.encoder.saved import load_run_dir

    plain = load_encoder(tiny_model_spec)
    cropped = load_encoder(tiny_model_spec, crop_pct=0.5)
    squashed = load_encoder(tiny_model_spec, resize_mode="squash")
    assert (plain.config.crop_pct, cropped.config.crop_pct, squashed.config.resize_mode) == (1.0, 0.5, "squash")
    assert len({plain.fingerprint(), cropped.fingerprint(), squashed.fingerprint()}) == 3
    # a 64 x 32 image with a bright centre square: crop 0.5 sees only the centre, squash sees the whole width
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[8:24, 24:40] = 255
    image = Image.fromarray(pixels)
    assert cropped.eval_transform()(image).min() > 0   # every pixel bright (normalised above the mean)
    assert plain.eval_transform()(image).min() < 0     # the whole square holds dark pixels too
    assert squashed.eval_transform()(image).shape == (3, 32, 32)
    assert squashed.eval_transform()(image)[0, 16, :8].max() < 0   # the dark left edge is still in the picture
    # saved and loaded back with it, fingerprint unchanged
    from retrieval.encoder import save_encoder

    save_encoder(cropped, tmp_path / "cropped")
    again = load_run_dir(tmp_path / "cropped")
    assert again.config.crop_pct == 0.5 and again.fingerprint() == cropped.fingerprint()


def test_a_run_directory_keeps_the_crop_its_encoder_json_records(tiny_model_spec, tmp_path):
    from retrieval.encoder import load_encoder, save_encoder

    encoder = load_encoder(tiny_model_spec, crop_pct=0.875)
    save_encoder(encoder, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "encoder.json").read_text())["config"]["crop_pct"] == 0.875
    loaded = load_encoder(str(tmp_path / "run"))
    assert loaded.config.crop_pct == 0.875 and loaded.fingerprint() == encoder.fingerprint()


def test_index_records_the_resize_and_query_and_later_runs_use_it(tiny_run_dir, tmp_path):
    from indexer.store.search import SearchIndex

    folder = tmp_path / "images"
    make_folder(folder, classes=2, per_class=3)
    db = tmp_path / "db"
    assert _invoke("index", folder, "--db", db, "--model", tiny_run_dir, "--crop-pct", "0.5", "--workers", "0",
                   ).exit_code == 0
    recorded = _header(db).encoder
    assert (recorded.crop_pct, recorded.resize_mode) == (0.5, "shortest")

    # query rebuilds the encoder with the DB's crop: an indexed image finds itself at cosine 1
    image = folder / "class1" / "img002.jpg"
    found = _invoke("query", image, "--db", db, "-k", "1", "--json")
    assert found.exit_code == 0, found.output
    assert json.loads(found.output)[0]["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)

    # a later run without --crop-pct keeps the DB's crop (new files are encoded with it)
    make_folder(folder, classes=3, per_class=3)
    later = _invoke("index", folder, "--db", db, "--model", tiny_run_dir, "--workers", "0", "--json")
    assert later.exit_code == 0, later.output
    assert _header(db).encoder == recorded

    # another crop is another encoder: a new generation is built beside the live one and switched to
    other = _invoke("index", folder, "--db", db, "--model", tiny_run_dir, "--crop-pct", "0.75", "--workers", "0")
    assert other.exit_code == 0, other.output
    with SearchIndex.open(db) as index:
        assert (index.generation_id, index.header.encoder.crop_pct) == (2, 0.75)
    assert _header(db).encoder == recorded   # generation 1 kept for a rollback


def test_a_db_header_without_the_fields_reads_as_not_recorded():
    from indexer.store.layout import EncoderInfo, Header

    old = {"encoder": {"spec": "lite0", "fingerprint": "f" * 64, "dim": 512, "image_size": 224}, "root": "/x"}
    header = Header.from_bytes(json.dumps(old).encode())
    assert header.encoder == EncoderInfo("lite0", "f" * 64, 512, 224, None, None)


def test_an_old_lite0_db_opens_with_its_old_crop_even_if_the_default_changes(tmp_path, monkeypatch):
    """A DB written before the crop was recorded (spec 'lite0', lite0's fingerprint at crop 0.875) still opens
    and queries embed with 0.875, also when `lite0` itself now loads with another crop."""
    from indexer.store.layout import EncoderInfo, NewItem
    from indexer.store.lmdb_store import Store
    from indexer.store.read import load_db_encoder
    from indexer.store.search import SearchIndex
    from retrieval.encoder import legacy_crop_pct, load_encoder, sources

    assert legacy_crop_pct("lite0") == legacy_crop_pct("lite2") == 0.875
    assert legacy_crop_pct("ViT-B-32:openai") is None and legacy_crop_pct(str(tmp_path)) is None
    old = load_encoder("lite0", crop_pct=0.875)
    with Store.open(tmp_path / "db", readonly=False) as store:
        # crop_pct / resize_mode None: as an old DB reads
        store.begin_run(EncoderInfo("lite0", old.fingerprint(), old.embed_dim, old.image_size), str(tmp_path))
        vector = np.ones(old.embed_dim, np.float32) / np.sqrt(old.embed_dim)
        store.commit_batch([NewItem("c/a.jpg", "c", 1, 0, 1, 1, b"\0" * 16, vector)], [])

    monkeypatch.setattr(sources, "LITE_CROP_PCT", 1.0)   # as if the shipped default had moved to the whole image
    assert load_encoder("lite0").config.crop_pct == 1.0
    assert load_encoder("lite0").fingerprint() != old.fingerprint()
    with SearchIndex.open(tmp_path / "db", gpu=False) as index:
        encoder = load_db_encoder(index, device="cpu")
    assert encoder.config.crop_pct == 0.875 and encoder.fingerprint() == old.fingerprint()

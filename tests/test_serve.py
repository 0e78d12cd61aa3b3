"""The serve API through FastAPI's TestClient on a DB of the generated bird set (tiny random encoder): uploads
find themselves with `query --json`'s exact answer, "more like this" equals brute force over the stored
embeddings, thumbnails only by id, every bad input's status and message, 503 when the queue is full, when too many
uploads are in the server and when a request waited past --max-wait-ms (never encoded), and an
`index` run's new images answered without restart."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from cli import cli  # noqa: E402
from indexer.serve.app import create_app  # noqa: E402
from indexer.serve.engine import ServeConfig  # noqa: E402
from tests.index_support import cli_index  # noqa: E402

N_CLASSES, PER_CLASS = 4, 5


def _index(folder: Path, db: Path, model: Path):
    from indexer.build.pipeline import IndexConfig, run_index

    return run_index(IndexConfig(folder=folder, db_dir=db, model=str(model), workers=0))


def _generated(out: Path, classes: int = N_CLASSES, per_class: int = PER_CLASS, seed: int = 0) -> Path:
    from retrieval.data.generate import GenerateConfig, make_dataset

    return make_dataset(GenerateConfig(out, classes=classes, per_class=per_class, size=64, seed=seed)).root / "images"


def _db_contents(db: Path) -> dict:
    """What the DB holds, read before any app opens it (one LMDB environment per process at a time)."""
    from indexer.store.lmdb_store import Store

    with Store.open(db) as store, store.snapshot() as snap:
        ids = snap.ids()
        items = snap.items(ids)
        return {"ids": ids, "vectors": snap.vectors(ids), "relpaths": [i.relpath for i in items],
                "labels": [i.label for i in items], "header": snap.header}


@pytest.fixture(scope="module")
def served(tiny_run_dir, tmp_path_factory) -> dict:
    """The generated set indexed with the tiny encoder, `query --json` of three of its images (one CLI run
    each, as a client would send them one at a time), and the DB's contents."""
    root = tmp_path_factory.mktemp("serve")
    images = _generated(root / "birds")
    db = root / "db"
    _index(images, db, tiny_run_dir)
    queries = sorted(images.glob("*/*.jpg"))[:: PER_CLASS * N_CLASSES // 3][:3]
    expected = {}
    for path in queries:
        result = CliRunner().invoke(cli, ["query", str(path), "--db", str(db), "-k", "6", "--json"])
        assert result.exit_code == 0, result.output
        expected[path] = json.loads(result.output)[0]
    return {"images": images, "db": db, "queries": queries, "expected": expected, **_db_contents(db)}


@pytest.fixture(scope="module")
def client(served, single_thread_torch):
    with TestClient(create_app(ServeConfig(db=served["db"], device="cpu"))) as c:
        yield c


def _upload(client, data: bytes, name: str = "q.jpg", k: int | str | None = None, field: str = "image"):
    url = "/api/search" if k is None else f"/api/search?k={k}"
    return client.post(url, files={field: (name, data, "application/octet-stream")})


def _jpeg(size=(64, 64), seed=0) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        out, format="JPEG")
    return out.getvalue()


def test_an_indexed_image_finds_itself_with_the_same_answer_as_query_json(client, served):
    for path in served["queries"]:
        resp = _upload(client, path.read_bytes(), name=path.name, k=6)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        relpath = path.relative_to(served["images"]).as_posix()
        assert body["results"][0]["path"] == relpath and body["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
        expected = served["expected"][path]  # query --json: a local command, absolute paths
        assert body["query"] == path.name
        assert [{key: h[key] for key in ("rank", "score", "label")} for h in body["results"]] == \
            [{key: h[key] for key in ("rank", "score", "label")} for h in expected["results"]]
        assert [str(served["images"] / h["path"]) for h in body["results"]] == [h["path"] for h in expected["results"]]
        by_id = dict(zip(served["ids"].tolist(), served["relpaths"], strict=True))
        assert [by_id[h["id"]] for h in body["results"]] == [h["path"] for h in body["results"]]
        t = body["timings"]
        assert t["decode_ms"] > 0 and t["embed_ms"] > 0 and t["search_ms"] >= 0 and t["batch"] >= 1
        assert t["total_ms"] >= t["decode_ms"] + t["embed_ms"] + t["search_ms"]


def test_k_defaults_to_the_configured_value_and_is_honoured(client, served):
    data = served["queries"][0].read_bytes()
    assert len(_upload(client, data).json()["results"]) == 10
    assert len(_upload(client, data, k=3).json()["results"]) == 3
    assert len(_upload(client, data, k=1000).json()["results"]) == len(served["ids"])


def test_expand_searches_with_the_expanded_upload_as_query_expand_does(client, served):
    path = served["queries"][1]
    resp = client.post("/api/search?k=5&expand=3", files={"image": (path.name, path.read_bytes(), "image/jpeg")})
    assert resp.status_code == 200, resp.text
    # the upload is an indexed image: its embedding is the stored one, so expand with its 3 nearest (itself first)
    e = served["vectors"].astype(np.float64)
    own = served["relpaths"].index(str(path.relative_to(served["images"])))
    first = sorted(range(len(e)), key=lambda j: (-(e[own] @ e[j]), j))[:3]
    total = e[own] + sum(max(e[own] @ e[j], 0.0) ** 3 * e[j] for j in first)
    sims = e @ (total / np.linalg.norm(total))
    order = sorted(range(len(e)), key=lambda j: (-sims[j], j))[:5]
    assert [h["id"] for h in resp.json()["results"]] == served["ids"][order].tolist()
    assert [h["score"] for h in resp.json()["results"]] == pytest.approx(sims[order], abs=1e-5)
    assert client.post("/api/search?expand=-1", files={"image": (path.name, path.read_bytes())}).status_code == 422


def test_more_like_this_is_brute_force_over_the_stored_embeddings(client, served):
    ids, vectors = served["ids"], served["vectors"]
    for row in (0, len(ids) // 2, len(ids) - 1):
        resp = client.get(f"/api/items/{ids[row]}/similar?k=5")
        assert resp.status_code == 200, resp.text
        body = resp.json()
        scores = vectors @ vectors[row]
        scores[row] = -np.inf  # the item itself is the query, not a result
        top = np.argsort(-scores, kind="stable")[:5]
        assert [h["id"] for h in body["results"]] == ids[top].tolist()
        np.testing.assert_allclose([h["score"] for h in body["results"]], scores[top], atol=1e-5)
        assert [h["rank"] for h in body["results"]] == [1, 2, 3, 4, 5]
        assert body["query_id"] == int(ids[row]) and body["query"] == served["relpaths"][row]
        assert body["served_by"] == {"generation": 1, "fingerprint": served["header"].encoder.fingerprint}
        assert [h["label"] for h in body["results"]] == [served["labels"][i] for i in top]


def test_label_filters_are_searched_on_the_server_and_return_k_of_those_labels(client, served):
    ids, vectors, labels = served["ids"], served["vectors"], np.array(served["labels"])
    row = 0
    others = sorted(set(labels) - {labels[row]})
    for wanted in ([others[0]], others[:2]):
        mask = np.isin(labels, wanted)
        scores = np.where(mask, vectors @ vectors[row], -np.inf)
        top = np.argsort(-scores, kind="stable")[:4]
        query = "&".join(f"label={w}" for w in wanted)
        similar = client.get(f"/api/items/{ids[row]}/similar?k=4&{query}").json()
        upload = client.post(f"/api/search?k=4&{query}",
                             files={"image": ("q.jpg", (served["images"] / served["relpaths"][row]).read_bytes())})
        for body in (similar, upload.json()):
            assert [h["id"] for h in body["results"]] == ids[top].tolist()
            assert {h["label"] for h in body["results"]} <= set(wanted)
            np.testing.assert_allclose([h["score"] for h in body["results"]], scores[top], atol=1e-5)
    assert client.get(f"/api/items/{ids[row]}/similar?k=4&label=no-such-label").json()["results"] == []
    everything = client.get(f"/api/items/{ids[row]}/similar?k=1000&label={labels[row]}").json()["results"]
    assert len(everything) == PER_CLASS - 1  # all of the item's own label but itself


def test_thumbnails_by_id_only(client, served):
    item_id, rel = int(served["ids"][3]), served["relpaths"][3]
    resp = client.get(f"/api/items/{item_id}/thumbnail")
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/jpeg"
    thumb = np.asarray(Image.open(io.BytesIO(resp.content)).convert("RGB"), dtype=np.float32)
    original = np.asarray(Image.open(served["images"] / rel).convert("RGB"), dtype=np.float32)
    assert thumb.shape == original.shape  # 64 px is under the 160 px cap: kept, not enlarged
    assert np.abs(thumb - original).mean() < 8  # the same picture, re-encoded as JPEG
    assert client.get(f"/api/items/{item_id}/thumbnail").content == resp.content  # cached
    unknown = int(served["ids"].max()) + 1
    for url in (f"/api/items/{unknown}/thumbnail", f"/api/items/{unknown}/similar",
                "/api/items/..%2F..%2F..%2Fetc%2Fpasswd/thumbnail", "/api/items/%2e%2e/thumbnail",
                "/api/items/..%252Fcli.py/thumbnail", f"/api/items/{item_id}%00/thumbnail",
                f"/api/items/{item_id}%2F..%2F..%2Fcli.py/thumbnail", "/api/items/-1/thumbnail",
                "/api/items/0x1/thumbnail", "/api/items/%EF%BC%91/thumbnail", "/api/items/1e3/similar",
                "/api/items/99999999999999999999999/thumbnail", f"/api/items/{item_id}/../../cli.py",
                "/static/index.html", "/static/", "/indexer/static/index.html", "/cli.py", "/..%2Fcli.py"):
        got = client.get(url)
        assert got.status_code == 404, (url, got.status_code, got.text)
        assert got.headers["content-type"] == "application/json"
    assert client.get(f"/api/items/{item_id}/similar?k=..%2F..%2Fetc").status_code == 422


def test_bad_uploads_get_their_status_and_the_decoders_reason(client, served):
    real = served["queries"][0].read_bytes()
    cases = [
        (b"not an image at all", "notes.txt", 400, "notes.txt: not a recognised image format"),
        (b"", "empty.jpg", 400, "empty.jpg: empty file (0 bytes)"),
        (real[: len(real) // 2], "half.jpg", 400, "half.jpg: cannot decode: OSError: "),  # "...truncated..."
        (_png_header(10_000, 10_000), "bomb.png", 400,
         "bomb.png: too many pixels (10000x10000 = 100,000,000); the cap is max_pixels=89,478,485"),
    ]
    for data, name, status, message in cases:
        resp = _upload(client, data, name=name)
        assert resp.status_code == status, resp.text
        assert resp.json()["detail"].startswith(message), resp.json()
        assert name != "half.jpg" or "runcated" in resp.json()["detail"]
    for k in (0, 1001, "abc", -5):
        resp = _upload(client, real, k=k)
        assert resp.status_code == 422, resp.text
        assert resp.json()["detail"][0]["loc"] == ["query", "k"]
    assert client.get(f"/api/items/{served['ids'][0]}/similar?k=0").status_code == 422
    resp = _upload(client, real, field="file")
    assert resp.status_code == 400 and resp.json()["detail"] == "no file in the form field 'image'"
    resp = client.post("/api/search", json={"image": "/etc/passwd"})
    assert resp.status_code == 400 and "multipart/form-data" in resp.json()["detail"]
    assert client.get("/api/search").status_code == 405


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (a pixel bomb): signature, IHDR, IEND, valid CRCs."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def test_stats_health_and_the_page(client, served, tiny_run_dir):
    stats = client.get("/api/stats").json()
    assert stats["items"] == len(served["ids"]) == N_CLASSES * PER_CLASS
    on_disk = {d.name: len(list(d.glob("*.jpg"))) for d in served["images"].iterdir() if d.is_dir()}
    assert {e["label"]: e["count"] for e in stats["labels"]} == on_disk
    header = served["header"]
    assert stats["encoder"]["fingerprint"] == json.loads((tiny_run_dir / "encoder.json").read_text())["fingerprint"]
    assert header.encoder.spec == str(tiny_run_dir) and stats["encoder"]["spec"] == tiny_run_dir.name
    assert stats["encoder"]["dim"] == header.encoder.dim
    # the preprocessing uploads get: the DB's recorded eval transform
    assert (stats["encoder"]["crop_pct"], stats["encoder"]["resize_mode"], stats["encoder"]["tta"]) == (
        header.encoder.crop_pct, header.encoder.resize_mode, header.encoder.tta)
    assert stats["encoder"]["engine"] == "onnxruntime fp32"   # the default engine, as the DB recorded it
    assert stats["generation"] == header.generation and stats["faiss_lags"] is False
    assert stats["ann"] == {"kind": "auto", "factory": "Flat"} and stats["device"] == "cpu"
    assert client.get("/healthz").json() == {"status": "ok"}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>circle-retrieval" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: works offline
    assert "innerHTML" not in page.text and "insertAdjacentHTML" not in page.text  # server strings stay text
    assert "access-control-allow-origin" not in client.get("/api/stats", headers={"Origin": "http://evil.test"}).headers


def test_no_server_path_in_any_answer_unless_show_paths(client, served, tiny_run_dir, tmp_path):
    """Every endpoint's body and headers, good and bad requests: neither the indexed folder, the DB nor the
    encoder's run directory appears (items are named by their path relative to the indexed folder)."""
    item_id = int(served["ids"][0])
    answers = [_upload(client, served["queries"][0].read_bytes()), _upload(client, b"junk", name="x.txt"),
               client.get(f"/api/items/{item_id}/similar"), client.get(f"/api/items/{item_id}/thumbnail"),
               client.get("/api/items/999999/similar"), client.get("/api/stats"), client.get("/healthz"),
               client.get("/"), client.get("/nope")]
    secrets = [str(served["images"]), str(served["db"]), str(tiny_run_dir), str(served["images"].parent)]
    for resp in answers:
        text = resp.content.decode("latin-1") + repr(dict(resp.headers))
        assert not [s for s in secrets if s in text], (resp.request.url, text[:300])
    db = tmp_path / "db"
    shutil.copytree(served["db"], db)
    with TestClient(create_app(ServeConfig(db=db, device="cpu", show_paths=True))) as shown:
        body = shown.get(f"/api/items/{item_id}/similar").json()
        assert body["query"] == str(served["images"] / served["relpaths"][0])
        assert all(Path(h["path"]).is_absolute() and Path(h["path"]).exists() for h in body["results"])
        assert shown.get("/api/stats").json()["encoder"]["spec"] == str(tiny_run_dir)


def test_the_access_key_guards_the_api_in_constant_time_but_not_healthz(served, single_thread_torch, tmp_path):
    db = tmp_path / "db"
    shutil.copytree(served["db"], db)
    key = "correct horse battery staple"
    item_id = int(served["ids"][0])
    with TestClient(create_app(ServeConfig(db=db, device="cpu", api_key=key))) as c:
        calls = [lambda h: c.get("/api/stats", headers=h), lambda h: c.get(f"/api/items/{item_id}/similar", headers=h),
                 lambda h: c.get(f"/api/items/{item_id}/thumbnail", headers=h),
                 lambda h: c.post("/api/search", headers=h, files={"image": ("q.jpg", _jpeg(), "image/jpeg")})]
        refused = [{}, {"Authorization": key}, {"Authorization": "Bearer " + key[:-1]},
                   {"Authorization": "Bearer " + key + "x"}, {"Authorization": "Basic " + key}]
        for call in calls:
            for headers in refused:
                resp = call(headers)
                assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer", (headers, resp.text)
                assert key not in resp.text
            assert call({"Authorization": "Bearer " + key}).status_code == 200
            assert call({"authorization": "bearer " + key}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200
    assert key not in repr(ServeConfig(db=db, api_key=key))


def test_metrics_count_what_was_asked_and_parse_with_prometheus_own_parser(served, single_thread_torch, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    db = tmp_path / "db"
    shutil.copytree(served["db"], db)
    key = {"Authorization": "Bearer k"}
    item_id = int(served["ids"][1])
    with TestClient(create_app(ServeConfig(db=db, device="cpu", api_key="k"))) as c:
        for path in served["queries"]:
            assert c.post("/api/search", headers=key, files={"image": ("q.jpg", path.read_bytes())}).status_code == 200
        assert c.post("/api/search", headers=key, files={"image": ("x.txt", b"text")}).status_code == 400
        assert c.get(f"/api/items/{item_id}/similar", headers=key).status_code == 200
        assert c.get("/api/stats").status_code == 401
        assert c.get("/metrics").status_code == 401
        scraped = c.get("/metrics", headers=key)
        assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    samples: dict[tuple, float] = {}
    for family in text_string_to_metric_families(scraped.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    uploads = len(served["queries"])
    assert value("serve_requests_total", route="/api/search", method="POST", status="200") == uploads
    assert value("serve_requests_total", route="/api/search", method="POST", status="400") == 1
    assert value("serve_requests_total", route="/api/items/{item_id}/similar", method="GET", status="200") == 1
    assert value("serve_requests_total", route="other", method="GET", status="401") == 2  # refused before routing
    assert value("serve_request_duration_seconds_count", route="/api/search") == uploads + 1
    for stage, count in (("decode", uploads), ("embed", uploads), ("search", uploads + 1), ("total", uploads + 1)):
        assert value("serve_stage_duration_seconds_count", stage=stage) == count
        assert value("serve_stage_duration_seconds_bucket", stage=stage, le="+Inf") == count
    assert value("serve_batch_size_sum") == uploads  # every upload embedded once, in batches of any size
    assert 1 <= value("serve_batch_size_count") <= uploads
    assert value("serve_queue_depth") == 0
    assert value("serve_index_items") == len(served["ids"])
    assert value("serve_db_generation") == served["header"].generation
    assert value("serve_index_generation") == 1
    assert value("serve_faiss_lags") == 0
    fingerprint = served["header"].encoder.fingerprint
    assert value("serve_encoder_info", spec=Path(served["header"].encoder.spec).name, fingerprint=fingerprint) == 1
    assert not [k for k in samples if k[0] == "serve_shed_total"]  # no 503 yet: the labelled series is absent


def test_a_public_host_needs_a_key_or_an_explicit_no_auth():
    from indexer.serve.auth import check_exposure
    from retrieval.errors import RetrievalError

    for host in ("127.0.0.1", "localhost", "::1"):
        check_exposure(ServeConfig(db=Path("db"), host=host))
    check_exposure(ServeConfig(db=Path("db"), host="0.0.0.0", api_key="k"))
    check_exposure(ServeConfig(db=Path("db"), host="0.0.0.0", no_auth=True))
    with pytest.raises(RetrievalError, match="refusing to serve on 0.0.0.0 without an access key"):
        check_exposure(ServeConfig(db=Path("db"), host="0.0.0.0"))


@pytest.fixture(scope="module")
def strict_client(served, single_thread_torch, tmp_path_factory):
    """A service with a 50 KB upload limit, room for one waiting request, and CORS for one origin (on a copy of
    the DB: LMDB opens an environment once per process)."""
    db = tmp_path_factory.mktemp("strict") / "db"
    shutil.copytree(served["db"], db)
    cfg = ServeConfig(db=db, device="cpu", max_upload_bytes=50_000, queue_size=1,
                      cors="http://allowed.test")
    with TestClient(create_app(cfg)) as c:
        yield c


def test_too_large_uploads_get_413_with_and_without_content_length(strict_client):
    big = _jpeg((400, 400))
    assert len(big) > 50_000
    resp = _upload(strict_client, big, name="big.jpg")
    assert resp.status_code == 413 and "limit of 0.0476837 MB" in resp.json()["detail"]
    boundary = "xxBOUNDARYxx"

    def chunked():  # no Content-Length: the limit is enforced while the body streams
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n\r\n'.encode()
        for _ in range(40):
            yield b"\xff" * 10_000
        yield f"\r\n--{boundary}--\r\n".encode()

    resp = strict_client.post("/api/search", content=chunked(),
                              headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert resp.status_code == 413
    small = _jpeg((64, 64))
    assert _upload(strict_client, small).status_code == 200


def test_a_full_queue_answers_503_with_retry_after(strict_client):
    engine = strict_client.app.state.engine
    release, running = threading.Event(), threading.Event()
    try:
        engine.batcher.call(lambda: (running.set(), release.wait(20)))  # the worker is busy...
        assert running.wait(10)
        engine.batcher.call(lambda: None)  # ...and the one waiting place is taken
        resp = _upload(strict_client, _jpeg())
        assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
        assert 'serve_shed_total{route="/api/search"} 1.0' in strict_client.get("/metrics").text
        assert resp.json()["detail"].startswith("busy: 1 requests are already waiting")
        assert strict_client.get("/api/stats").status_code == 503
    finally:
        release.set()
    deadline = time.monotonic() + 20
    while strict_client.get("/healthz").status_code == 200 and time.monotonic() < deadline:
        if _upload(strict_client, _jpeg()).status_code == 200:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the service did not recover after the queue drained")


def _blocking_worker(engine) -> threading.Event:
    """Occupy the engine's worker until the returned event is set (so that requests wait in its queue)."""
    release, running = threading.Event(), threading.Event()
    engine.batcher.call(lambda: (running.set(), release.wait(20)))
    assert running.wait(10)
    return release


def _in_background(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("resp", fn()))
    thread.start()
    return thread, out


def test_uploads_beyond_queue_size_are_shed_before_decoding(strict_client):
    engine = strict_client.app.state.engine
    release = _blocking_worker(engine)
    try:
        first, out = _in_background(lambda: _upload(strict_client, _jpeg()))
        deadline = time.monotonic() + 20
        while engine.batcher.depth() < 1 and time.monotonic() < deadline:  # decoded, waiting for the worker
            time.sleep(0.01)
        resp = _upload(strict_client, _jpeg(seed=1))  # queue_size=1: the first upload fills the server
        assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
        assert resp.json()["detail"] == "busy: 1 uploads are already in the server; retry shortly"
    finally:
        release.set()
    first.join(20)
    assert out["resp"].status_code == 200
    assert strict_client.app.state.admission.inside == 0


def test_a_request_waiting_past_max_wait_ms_gets_503_and_is_never_encoded(served, single_thread_torch, tmp_path):
    db = tmp_path / "db"
    shutil.copytree(served["db"], db)
    wait_s = 0.2
    with TestClient(create_app(ServeConfig(db=db, device="cpu", max_wait_ms=1000 * wait_s))) as client:
        engine = client.app.state.engine
        batches: list[int] = []
        engine.on_batch = batches.append
        release = _blocking_worker(engine)
        try:
            late, out = _in_background(lambda: _upload(client, _jpeg()))
            while engine.batcher.depth() < 1 and late.is_alive():
                time.sleep(0.01)
            seen = time.monotonic()  # the upload arrived before this: its deadline is at most wait_s later
            while time.monotonic() <= seen + wait_s:
                time.sleep(0.01)
        finally:
            release.set()
        late.join(20)
        resp = out["resp"]
        assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
        assert "--max-wait-ms" in resp.json()["detail"]
        assert batches == []  # dropped before the encoder
        assert _upload(client, _jpeg()).status_code == 200 and batches == [1]  # on time: answered


def test_cors_only_for_the_configured_origin(strict_client):
    allowed = strict_client.get("/api/stats", headers={"Origin": "http://allowed.test"})
    assert allowed.headers["access-control-allow-origin"] == "http://allowed.test"
    other = strict_client.get("/api/stats", headers={"Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in other.headers


@pytest.mark.slow
def test_a_second_index_run_is_answered_without_restart(tiny_run_dir, tmp_path, single_thread_torch):
    images = _generated(tmp_path / "birds", classes=2, per_class=4)
    db = tmp_path / "db"
    _index(images, db, tiny_run_dir)
    with TestClient(create_app(ServeConfig(db=db, device="cpu", refresh_s=0.2))) as client:
        before = client.get("/api/stats").json()
        assert before["items"] == 8
        extra = _generated(tmp_path / "more", classes=2, per_class=3, seed=5)
        for src in extra.glob("*/*.jpg"):
            dst = images / ("new-" + src.parent.name) / src.name
            dst.parent.mkdir(exist_ok=True)
            shutil.copy(src, dst)
        gone = sorted(images.glob("*/*.jpg"))[0]
        gone_id = next(h["id"] for h in _upload(client, gone.read_bytes(), k=1).json()["results"])
        gone.unlink()
        run = cli_index(images, db, tiny_run_dir)
        assert run.returncode == 0, run.stderr
        deadline = time.monotonic() + 30
        while (stats := client.get("/api/stats").json())["items"] != 8 + 6 - 1:
            assert time.monotonic() < deadline, stats
            time.sleep(0.1)
        assert stats["generation"] > before["generation"]
        assert {"new-" + d.name for d in extra.iterdir() if d.is_dir()} <= {e["label"] for e in stats["labels"]}
        for new in sorted((images).glob("new-*/*.jpg"))[:3]:
            top = _upload(client, new.read_bytes(), k=1).json()["results"][0]
            assert top["path"] == new.relative_to(images).as_posix() and top["score"] == pytest.approx(1.0, abs=1e-5)
        assert client.get(f"/api/items/{gone_id}/thumbnail").status_code == 404
        assert client.get(f"/api/items/{gone_id}/similar").status_code == 404

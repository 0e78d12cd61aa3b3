"""serve across a switch of the live generation: clients keep uploading while `index --model OTHER` builds
generation 2 beside the served one and switches; no request fails, and every answer is exactly the one its
named generation gives (embedded by that generation's encoder, searched in its vectors)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from indexer.build.pipeline import IndexConfig, run_index  # noqa: E402
from indexer.serve.app import create_app  # noqa: E402
from indexer.serve.engine import ServeConfig  # noqa: E402
from tests.index_support import cli_index, make_folder, save_run  # noqa: E402

K = 5
PER_CLIENT = 20_000  # bound on each client's requests (each pauses PAUSE_S between them: a build may take a while)
PAUSE_S = 0.01


def _expected(db, gen: int, uploads: dict[str, bytes]) -> tuple[str, dict[str, tuple[list[int], np.ndarray]]]:
    """(fingerprint, upload -> exact top-K (ids, scores)) of generation `gen`: each upload decoded as serve
    decodes it, embedded by the generation's encoder, ranked by brute force over its stored embeddings."""
    from indexer.store.read import embed_tensors, load_db_encoder
    from indexer.store.search import SearchIndex
    from retrieval.data.decode import decode_image

    with SearchIndex.open(db, generation=gen) as index:
        encoder = load_db_encoder(index, device="cpu")
        ids = index.ids()
        vectors = index.vectors(ids)
        transform, out = encoder.eval_transform(), {}
        for name, data in uploads.items():
            image = decode_image(data, name=name, draft_size=encoder.config.resize_size).image
            scores = vectors @ embed_tensors(encoder, [transform(image)])[0]
            top = np.argsort(-scores, kind="stable")[:K]
            out[name] = (ids[top].tolist(), scores[top])
        return index.header.encoder.fingerprint, out


@pytest.mark.slow
def test_a_switch_under_upload_load_fails_nothing_and_each_answer_is_one_generations(
        tiny_run_dir, tiny_model_spec, tmp_path, single_thread_torch):
    folder, db = tmp_path / "images", tmp_path / "db"
    rels = make_folder(folder, classes=3, per_class=5)
    run_index(IndexConfig(folder=folder, db_dir=db, model=str(tiny_run_dir), workers=0))
    other = save_run(tiny_model_spec, tmp_path / "other", perturb=1, embed_dim=16)
    uploads = {rel.replace("/", "_"): (folder / rel).read_bytes() for rel in rels[::3]}
    answers: list[tuple[str, dict]] = []
    failures: list[tuple[int, str]] = []
    stop = threading.Event()

    with TestClient(create_app(ServeConfig(db=db, device="cpu", refresh_s=0.05))) as client:
        def upload_loop(start: int) -> None:
            names = sorted(uploads)
            for i in range(PER_CLIENT):
                if stop.is_set():
                    return
                name = names[(start + i) % len(names)]
                resp = client.post(f"/api/search?k={K}", files={"image": (name, uploads[name], "image/jpeg")})
                if resp.status_code == 200:
                    answers.append((name, resp.json()))
                else:
                    failures.append((resp.status_code, resp.text))
                time.sleep(PAUSE_S)

        clients = [threading.Thread(target=upload_loop, args=(n,)) for n in range(3)]
        for thread in clients:
            thread.start()
        try:
            run = cli_index(folder, db, other)  # builds generation 2 beside the served one, then switches
            assert run.returncode == 0, run.stderr
            deadline = time.monotonic() + 60
            while not any(a["served_by"]["generation"] == 2 for _, a in answers[-50:]):
                assert time.monotonic() < deadline and all(t.is_alive() for t in clients), "no answer by generation 2"
                time.sleep(0.05)
            switched_at = len(answers)
            while len(answers) < switched_at + 30 and any(t.is_alive() for t in clients):
                time.sleep(0.02)
        finally:
            stop.set()
            for thread in clients:
                thread.join(timeout=120)
        stats = client.get("/api/stats").json()
    assert failures == []
    assert stats["served_by"]["generation"] == 2 and stats["encoder"]["dim"] == 16
    by_generation = {gen: _expected(db, gen, uploads) for gen in (1, 2)}
    assert {a["served_by"]["generation"] for _, a in answers} == {1, 2}
    for name, answer in answers:
        gen = answer["served_by"]["generation"]
        fingerprint, expected = by_generation[gen]
        assert answer["served_by"]["fingerprint"] == fingerprint
        ids, scores = expected[name]
        assert [h["id"] for h in answer["results"]] == ids, (name, gen)
        np.testing.assert_allclose([h["score"] for h in answer["results"]], scores, atol=1e-4)


def test_an_upload_prepared_for_the_old_encoder_is_answered_whole_by_the_new_generation(
        tiny_run_dir, tiny_model_spec, tmp_path, single_thread_torch):
    """The race the switch must survive: an upload preprocessed for generation 1's encoder reaches the worker
    after the swap; it is preprocessed again for generation 2's and answered wholly by generation 2. (Both tiny
    encoders take the same input size, so this checks the answer, not that the pixels differed.)"""
    from indexer.serve.engine import Engine
    from indexer.store.generations import changing

    folder, db = tmp_path / "images", tmp_path / "db"
    rels = make_folder(folder, classes=2, per_class=3)
    run_index(IndexConfig(folder=folder, db_dir=db, model=str(tiny_run_dir), workers=0))
    other = save_run(tiny_model_spec, tmp_path / "other", perturb=1, embed_dim=16)
    run_index(IndexConfig(folder=folder, db_dir=db, model=str(other), workers=0, switch=False))
    data = (folder / rels[4]).read_bytes()
    engine = Engine(ServeConfig(db=db, device="cpu", refresh_s=0.05))
    try:
        early = engine.make_query(data, "q.jpg", K, (), 10**8)
        assert engine.batcher.submit(early).result(timeout=60).served_by.generation == 1
        with changing(db) as gens:  # what `generations --activate 2` does (without its listing: py-lmdb opens
            gens.activate(2)        # an environment once per process, and the engine holds generation 1's)
        deadline = time.monotonic() + 60
        while engine.batcher.call(engine.served_by).result(timeout=60).generation != 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert early.fingerprint != engine.fingerprint  # made for the old encoder
        answer = engine.batcher.submit(early).result(timeout=60)
        similar = engine.batcher.call(lambda: engine.similar(answer.hits[0].id, K)).result(timeout=60)
    finally:
        engine.close()
    fingerprint, expected = _expected(db, 2, {"q.jpg": data})
    assert (answer.served_by.generation, answer.served_by.fingerprint) == (2, fingerprint)
    assert [h.id for h in answer.hits] == expected["q.jpg"][0]
    np.testing.assert_allclose([h.score for h in answer.hits], expected["q.jpg"][1], atol=1e-4)
    assert similar is not None and similar[3].generation == 2

"""The storage and search side: a folder indexed into LMDB (source of truth) and FAISS (derived), then searched.

Data flows one way through the project; `indexer` holds the stages from the folder walk to the commands:

    files -> decode -> encode -> LMDB -> FAISS -> search -> query / eval / serve

    store/    what an index is: LMDB (lmdb_store.py, byte layouts in layout.py), FAISS derived from it (ann.py),
              SearchIndex, the one way to read an index (search.py), the readers' shared helpers (read.py)
    build/    how an index is filled: walk a folder (scan.py), compare it with the DB (plan.py), decode + encode
              (encode.py; ray_encode.py on Ray), the whole `index` run (pipeline.py)
    serve/    `serve`: the HTTP API + page (app.py) over the engine (engine.py) and its micro-batcher (batcher.py)
    query.py, eval_db.py, demo.py   the commands over store/ (and demo over everything)

build/ and serve/ import store/, never each other; the commands import any of them; `indexer` uses `retrieval`
(decoding, the encoder, metrics, reports), never the reverse (tests/test_layers.py).
"""

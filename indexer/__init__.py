"""The storage and search side: a folder indexed into LMDB (source of truth) and FAISS (derived), then searched.

Data flows one way through the project; `indexer` holds the stages from the folder walk to the commands:

    files -> decode -> encode -> LMDB -> FAISS -> search -> query / eval / serve

    scan.py, plan.py   files: walk a folder (stat only), compare it with the DB
    encode.py          decode workers -> the `retrieval` encoder -> batches for the store (ray_encode.py: on Ray)
    store.py           LMDB, the source of truth (byte layouts in layout.py)
    ann.py             FAISS, derived from LMDB and keyed by its ids
    search.py          SearchIndex, the one way to read an index
    image_query.py     query; eval_db.py: eval --db; demo.py: every step in one command
    serve.py           serve: HTTP API + page over serve_engine.py (encoder + SearchIndex, batcher.py)

`pipeline.run_index` drives files -> ... -> FAISS. `indexer` uses `retrieval` (decoding, the encoder, metrics,
reports), never the reverse.
"""

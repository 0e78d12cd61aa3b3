"""Batch indexer: folder -> decode -> encode -> LMDB (source of truth) -> FAISS (derived)."""

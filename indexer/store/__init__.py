"""What an index is: the LMDB store (source of truth), FAISS derived from it, and the one way to read both."""

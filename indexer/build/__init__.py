"""How an index is filled: scan -> plan -> decode/encode -> commit to the store (locally or on Ray)."""

"""What the index stores, and how each record is laid out in bytes (LMDB values are plain bytes).

Ids are the contract between LMDB and FAISS: an item's id never changes and is never reused; an item's
content (and so its embedding) never changes either: a changed file gets a new id.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from retrieval.hashing import splitmix64

if TYPE_CHECKING:
    from retrieval.encoder import Encoder

SCHEMA_VERSION = 2  # 2: long paths keyed by prefix + digest, raw file-name bytes, DB uuid, transient failures
KEY_PREFIX = 480  # LMDB keys hold at most 511 bytes: longer paths are keyed by 480 bytes + NUL + 16-byte digest
METRIC = "inner_product"  # on L2-normalised embeddings this is cosine similarity

_ITEM = struct.Struct("<qqII16sH")  # size, mtime_ns, width, height, content hash, label length
_PATH = struct.Struct("<Qqq")  # id, size, mtime_ns
_ID = struct.Struct(">Q")  # big-endian, so LMDB's byte order is numeric order
_MASK = (1 << 64) - 1
Raw = bytes | memoryview  # an LMDB value: bytes, or a zero-copy view inside a read snapshot


@dataclass(frozen=True)
class EncoderInfo:
    """What binds a DB to the encoder that filled it."""

    spec: str
    fingerprint: str
    dim: int
    image_size: int
    # The eval resize the spec was loaded with (the fingerprint covers it; spec + these rebuild the encoder).
    # None: a DB written before they were recorded, read with the spec's legacy crop (read.load_db_encoder).
    crop_pct: float | None = None
    resize_mode: str | None = None
    # Test-time augmentation ("none" | "flip"); None: a DB written before it was recorded (none).
    tta: str | None = None
    engine: str = "torch"  # how the vectors were computed (retrieval.encoder.engine); older DBs: torch fp32
    precision: str = "fp32"
    graph: str = ""  # int8: the quantized graph's file name in the DB folder (queries must use the same one)

    @classmethod
    def of(cls, encoder: Encoder) -> EncoderInfo:
        """The binding facts of a retrieval.encoder.Encoder."""
        return cls(encoder.spec, encoder.fingerprint(), encoder.embed_dim, encoder.image_size,
                   encoder.config.crop_pct, encoder.config.resize_mode, encoder.config.tta)


@dataclass(frozen=True)
class Header:
    """The DB's own description, stored under meta/header."""

    encoder: EncoderInfo
    root: str  # absolute path of the folder last indexed; item paths are relative to it
    uuid: str = ""  # random at creation: what ann.json names to say which DB its index was built from
    schema: int = SCHEMA_VERSION
    metric: str = METRIC
    next_id: int = 0
    generation: int = 0  # +1 per committed write transaction
    ids_digest: int = 0  # order-free digest of the item ids, see ids_digest()
    chunk_rows: int = 64  # embeddings per LMDB value in the vectors sub-database
    reembed_pending: bool = False  # a --reembed run started and has not finished
    created: str = ""
    updated: str = ""

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: Raw) -> Header:
        fields = json.loads(bytes(data))
        fields["encoder"] = EncoderInfo(**fields["encoder"])
        return cls(**fields)


@dataclass(frozen=True)
class Item:
    """One indexed image."""

    id: int
    relpath: str  # relative to Header.root, '/'-separated
    label: str  # class folder: first folder level below the root ('' for files directly in it)
    size: int
    mtime_ns: int
    width: int  # original size after EXIF orientation
    height: int
    content_hash: bytes  # blake2b-128 of the file's bytes


@dataclass(frozen=True)
class NewItem:
    """An image to store: its record (without an id yet) and its embedding."""

    relpath: str
    label: str
    size: int
    mtime_ns: int
    width: int
    height: int
    content_hash: bytes
    embedding: np.ndarray  # (dim,) float32, L2-normalised


@dataclass(frozen=True)
class Failure:
    """A file that could not be indexed; the stat values let an unchanged bad file be skipped next time."""

    relpath: str
    reason: str
    size: int = -1
    mtime_ns: int = -1
    ctime_ns: int = -1
    transient: bool = False  # not the file's fault (I/O error, too many open files, memory): retried every run
    limits: str = ""  # for a failure due to a cap (pixels, file size): the caps then (limits_key); retried when raised

    def to_bytes(self) -> bytes:
        fields: dict[str, object] = {"reason": self.reason, "size": self.size, "mtime_ns": self.mtime_ns,
                                     "ctime_ns": self.ctime_ns, "transient": self.transient}
        if self.limits:
            fields["limits"] = self.limits
        raw = os.fsencode(self.relpath)
        if len(raw) > KEY_PREFIX:  # the key holds only a prefix: keep the whole path in the value
            fields["path"] = raw.hex()
        return json.dumps(fields).encode()

    @classmethod
    def from_bytes(cls, key: Raw, data: Raw) -> Failure:
        fields = json.loads(bytes(data))
        raw = bytes.fromhex(fields.pop("path")) if "path" in fields else bytes(key)
        return cls(relpath=os.fsdecode(raw), **fields)


@dataclass(frozen=True)
class PathState:
    """What a path currently holds: the id of its item and the stat values it was indexed with."""

    id: int
    size: int
    mtime_ns: int
    path: bytes = b""  # the whole path, stored only when the key is a prefix + digest (see path_key)


def id_key(item_id: int) -> bytes:
    return _ID.pack(item_id)


def key_id(key: Raw) -> int:
    return _ID.unpack(key)[0]


def pack_item(item: NewItem) -> bytes:
    label = os.fsencode(item.label)
    head = _ITEM.pack(item.size, item.mtime_ns, item.width, item.height, item.content_hash, len(label))
    return head + label + os.fsencode(item.relpath)


def unpack_item(item_id: int, data: Raw) -> Item:
    size, mtime_ns, width, height, content_hash, label_len = _ITEM.unpack_from(data)
    rest = bytes(data[_ITEM.size:])
    return Item(item_id, os.fsdecode(rest[label_len:]), os.fsdecode(rest[:label_len]), size, mtime_ns, width,
                height, content_hash)


def pack_path(state: PathState) -> bytes:
    return _PATH.pack(state.id, state.size, state.mtime_ns) + state.path


def unpack_path(data: Raw) -> PathState:
    item_id, size, mtime_ns = _PATH.unpack_from(data)
    return PathState(item_id, size, mtime_ns, bytes(data[_PATH.size:]))


def ids_digest(ids: np.ndarray) -> int:
    """Order-free digest of a set of ids: sum of splitmix64(id) mod 2**64.

    LMDB keeps it up to date per transaction; comparing it with the digest of a FAISS index's ids tells in
    one pass whether the index holds exactly the DB's items (a stale file after a crash does not).
    """
    return int(splitmix64(ids).sum(dtype=np.uint64)) & _MASK


def digest_update(digest: int, added: np.ndarray, removed: np.ndarray) -> int:
    return (digest + ids_digest(added) - ids_digest(removed)) & _MASK


def path_key(relpath: str | bytes) -> bytes:
    """The key a relative path is stored under: its file-system bytes (odd names included) when they fit,
    else their first KEY_PREFIX bytes, a NUL (no path holds one) and a blake2b-128 digest of the whole path.

    Key order is path order, except among long paths sharing their first KEY_PREFIX bytes (which are
    neighbours in path order): a sorted walk stays mergeable with LMDB's key order by sorting each such run.
    """
    raw = os.fsencode(relpath)
    if len(raw) <= KEY_PREFIX:
        return raw
    return raw[:KEY_PREFIX] + b"\0" + hashlib.blake2b(raw, digest_size=16).digest()


def limits_key(max_pixels: int, max_file_bytes: int) -> str:
    """The caps a file was judged under, recorded with a failure they caused (so that changing them retries it)."""
    return f"max_pixels={max_pixels} max_file_bytes={max_file_bytes}"


def new_uuid() -> str:
    return uuid.uuid4().hex

"""Index generations: one DB directory holds a live generation and others beside it (a build, previous ones),
and one small pointer file says which is live, switched by one atomic rename.

Layout of DB_DIR:
  data.mdb, lock.mdb, ann.faiss, ann.json   generation 1: today's layout, in place (every existing DB is one)
  generations/<id>/                          generation 2, 3, ...: each a complete DB of the same layout
  generations.json                           the pointer: {"live", "history", "built", "next"}; absent: 1 is live
  generations.lock                           held by whoever changes generations (index, generations --activate)

Why separate directories (an LMDB environment and FAISS files each) rather than sub-databases of one
environment: a generation is then exactly today's DB, so every reader, writer, crash guarantee and FAISS file
works on it unchanged; dropping one frees its disk at once (sub-databases would leave free pages inside one
data.mdb that never shrinks); and a build can never touch the live generation's pages or files.

The pointer is the only shared state. `history` lists the generations that have been live (oldest first,
the live one last), `built` those whose build finished (only they may go live), `next` the next id (ids are
never reused, so a generation's id names one encoder's index for good). Item ids never collide across
generations either: generation G numbers its items from (G - 1) * ID_SPAN, so an id a client got from one
generation is simply not found in another (never another image).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from retrieval.errors import IndexStoreError
from retrieval.files import fsync, remove_stale_temporaries, write_text_atomic

from . import ann
from .lmdb_store import Store, acquire_lock, release_lock

POINTER = "generations.json"
GENERATIONS_DIR = "generations"
LOCK = "generations.lock"
ID_SPAN = 1 << 40  # item ids of generation G start at (G - 1) * ID_SPAN
_DROPPING = ".dropping-"


@dataclass(frozen=True)
class Pointer:
    """What generations.json says: the live generation, those once live, those built, the next id."""

    live: int = 1
    history: tuple[int, ...] = (1,)
    built: tuple[int, ...] = (1,)
    next: int = 2

    def state(self, gen: int) -> str:
        """live, previous (was live), built (finished, never live) or building."""
        if gen == self.live:
            return "live"
        if gen in self.history:
            return "previous"
        return "built" if gen in self.built else "building"


@dataclass(frozen=True)
class Generation:
    """One generation as `generations` lists it."""

    id: int
    state: str
    spec: str
    fingerprint: str
    dim: int
    items: int
    disk_bytes: int
    created: str
    path: Path = field(repr=False)

    def to_json(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def generation_dir(db_dir: str | Path, gen: int) -> Path:
    """Where generation `gen` lives: the DB directory itself for 1, generations/<gen>/ otherwise."""
    return Path(db_dir) if gen == 1 else Path(db_dir) / GENERATIONS_DIR / str(gen)


def first_item_id(gen: int) -> int:
    return (gen - 1) * ID_SPAN


def read_pointer(db_dir: str | Path) -> Pointer:
    """The pointer (the default, generation 1 live, when the DB has none: a DB from before generations)."""
    try:
        fields = json.loads((Path(db_dir) / POINTER).read_text())
    except FileNotFoundError:
        return Pointer()
    except (OSError, ValueError) as exc:
        raise IndexStoreError(f"{Path(db_dir) / POINTER} cannot be read: {exc}") from None
    return Pointer(fields["live"], tuple(fields["history"]), tuple(fields["built"]), fields["next"])


def exists(db_dir: str | Path, gen: int) -> bool:
    return (generation_dir(db_dir, gen) / "data.mdb").is_file()


def resolve(db_dir: str | Path, gen: int | None = None) -> tuple[int, Path]:
    """(id, directory) of generation `gen`, or of the live one; IndexStoreError if it does not exist."""
    pointer = read_pointer(db_dir)
    wanted = pointer.live if gen is None else gen
    if not exists(db_dir, wanted):
        if gen is None:
            Store.open(db_dir).close()  # raises "no index DB at ... (create one with ...)"
        known = ", ".join(str(g) for g in on_disk(db_dir)) or "none"
        raise IndexStoreError(f"{db_dir} has no generation {wanted} (generations: {known}; "
                              f"see python cli.py generations --db {db_dir})")
    return wanted, generation_dir(db_dir, wanted)


def on_disk(db_dir: str | Path) -> list[int]:
    """Ids of the generations present (with a data.mdb), ascending."""
    found = [1] if exists(db_dir, 1) else []
    with contextlib.suppress(FileNotFoundError):
        found += sorted(int(p.name) for p in (Path(db_dir) / GENERATIONS_DIR).iterdir()
                        if p.name.isdigit() and (p / "data.mdb").is_file())
    return found


def disk_bytes(db_dir: str | Path, gen: int) -> int:
    """Bytes of a generation's files on disk (allocated blocks, so a sparse data.mdb counts what it uses)."""
    path = generation_dir(db_dir, gen)
    names = ("data.mdb", "lock.mdb", ann.ANN_FILE, ann.ANN_META)
    files = [path / n for n in names] if gen == 1 else [p for p in path.rglob("*") if p.is_file()]
    total = 0
    for file in files:
        with contextlib.suppress(FileNotFoundError):
            total += file.stat().st_blocks * 512
    return total


def list_generations(db_dir: str | Path) -> list[Generation]:
    """Every generation on disk, ascending id (IndexStoreError if the DB has none)."""
    pointer, out = read_pointer(db_dir), []
    for gen in on_disk(db_dir):
        with Store.open(generation_dir(db_dir, gen)) as store, store.snapshot() as snap:
            header, items = snap.header, snap.count()
        enc = header.encoder if header is not None else None
        out.append(Generation(gen, pointer.state(gen), enc.spec if enc else "", enc.fingerprint if enc else "",
                              enc.dim if enc else 0, items, disk_bytes(db_dir, gen),
                              header.created if header else "", generation_dir(db_dir, gen)))
    if not out:
        Store.open(db_dir).close()  # raises "no index DB at ..."
    return out


def estimate_bytes(items: int, lmdb_bytes: int, dim: int, new_dim: int) -> int:
    """About the disk a generation of `items` embeddings of `new_dim` takes, scaled from the live one
    (`lmdb_bytes` in use for `items` embeddings of `dim`): the records (the same whatever the encoder), the
    embeddings (+5%: chunk masks and page slack, 3% measured), and the FAISS file twice (an exact index, the
    largest kind, and its next version written beside it before the rename)."""
    records = max(0, lmdb_bytes - items * 4 * dim)
    return int(records + items * 4 * new_dim * 1.05 + 2 * items * (4 * new_dim + 8))


class Generations:
    """The generations of one DB, held for changing (the DB's generations lock): make, switch, drop."""

    def __init__(self, db_dir: Path, lock_fd: int):
        self.db_dir = db_dir
        self._lock_fd: int | None = lock_fd

    @property
    def pointer(self) -> Pointer:
        return read_pointer(self.db_dir)

    def create(self) -> tuple[int, Path]:
        """A new generation's id and (empty) directory; its id is taken in the pointer first, never reused."""
        pointer = self.pointer
        gen = pointer.next
        self._write(replace(pointer, next=gen + 1))
        path = generation_dir(self.db_dir, gen)
        path.mkdir(parents=True, exist_ok=True)
        return gen, path

    def mark_built(self, gen: int) -> None:
        """Record that generation `gen` finished building (so it may go live)."""
        pointer = self.pointer
        if gen not in pointer.built:
            self._write(replace(pointer, built=(*pointer.built, gen)))

    def activate(self, gen: int) -> Pointer:
        """Make `gen` live: one atomic rename of the pointer. It must exist and have finished building."""
        pointer = self.pointer
        if not exists(self.db_dir, gen):
            raise IndexStoreError(f"{self.db_dir} has no generation {gen} (generations: "
                                  f"{', '.join(map(str, on_disk(self.db_dir)))})")
        if gen not in pointer.built:
            raise IndexStoreError(f"generation {gen} of {self.db_dir} has not finished building: run the same "
                                  f"`index` command again to finish it")
        history = (*[g for g in pointer.history if g != gen], gen)
        new = replace(pointer, live=gen, history=history)
        if new != pointer:
            self._write(new)
        return new

    def drop(self, gen: int) -> int:
        """Delete generation `gen` (never the live one); returns the bytes freed."""
        pointer = self.pointer
        if gen == pointer.live:
            raise IndexStoreError(f"generation {gen} is live in {self.db_dir}: activate another one first "
                                  f"(python cli.py generations --db {self.db_dir} --activate ID)")
        if not exists(self.db_dir, gen):
            raise IndexStoreError(f"{self.db_dir} has no generation {gen}")
        freed = disk_bytes(self.db_dir, gen)
        path = generation_dir(self.db_dir, gen)
        if gen == 1:  # in place: data.mdb first, so that a crash part-way leaves no half generation
            for name in ("data.mdb", "lock.mdb", ann.ANN_FILE, ann.ANN_META):
                (path / name).unlink(missing_ok=True)
        else:  # one rename makes it gone; the removal of the files may then take its time (or be resumed)
            gone = path.with_name(f"{_DROPPING}{gen}")
            os.rename(path, gone)
            fsync(path.parent)
            shutil.rmtree(gone)
        self._write(replace(pointer, history=tuple(g for g in pointer.history if g != gen),
                            built=tuple(g for g in pointer.built if g != gen)))
        return freed

    def prune(self, keep: int) -> list[int]:
        """Drop the previous generations beyond the `keep` most recently live; returns the ids dropped."""
        pointer = self.pointer
        previous = [g for g in pointer.history if g != pointer.live and exists(self.db_dir, g)]
        doomed = previous[: max(0, len(previous) - keep)]
        for gen in doomed:
            self.drop(gen)
        return doomed

    def _write(self, pointer: Pointer) -> None:
        write_text_atomic(self.db_dir / POINTER, json.dumps(asdict(pointer)))

    def close(self) -> None:
        if self._lock_fd is not None:
            release_lock(self.db_dir / LOCK, self._lock_fd)
            self._lock_fd = None


def manage(db_dir: str | Path, *, activate: int | None = None, drop: int | None = None,
           keep: int | None = None) -> list[Generation]:
    """`generations`: switch to `activate`, then drop `drop`, then keep only `keep` previous generations (each
    given one under the lock); returns the generations after that."""
    if activate is not None or drop is not None or keep is not None:
        resolve(db_dir)  # a DB must be there: never create one to manage it
        with changing(db_dir) as gens:
            if activate is not None:
                gens.activate(activate)
            if drop is not None:
                gens.drop(drop)
            if keep is not None:
                gens.prune(keep)
    return list_generations(db_dir)


@contextlib.contextmanager
def changing(db_dir: str | Path) -> Iterator[Generations]:
    """Hold the DB's generations lock (IndexStoreError "locked" if another process holds it) and clear what a
    killed holder left: temporary pointer files, half-removed generations."""
    db_dir = Path(db_dir)
    db_dir.mkdir(parents=True, exist_ok=True)
    gens = Generations(db_dir, acquire_lock(db_dir / LOCK, what="another index or generations command"))
    try:
        remove_stale_temporaries(db_dir / POINTER)
        with contextlib.suppress(FileNotFoundError):
            for stale in (db_dir / GENERATIONS_DIR).glob(f"{_DROPPING}*"):
                shutil.rmtree(stale)
        yield gens
    finally:
        gens.close()

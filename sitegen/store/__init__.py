"""The Parquet store: the one hand-off between compute and build. Only this package knows the layout.

    STORE/
      manifest.json                  written last: its presence marks a complete store
      vocab.parquet                  token_id, token (display string)
      sequences.parquet              seq_id, doc_id, char_start, char_end, token_ids
      <service>/layer=<L>/data.parquet   one row per neuron of layer L
      .work/                         checkpoints of an unfinished run (removed when it finishes)
      .manifest.lock                 flock'ed by every manifest update (never deleted)
      .merging                       only while `sitegen merge` writes the store: the command to rerun
      dictionaries/<name>/           a store of the same layout per --sae dictionary: its latents as
                                     one layer of units (manifest: `dictionary`; the model's lists them)

Every file is written to a unique temporary name, flushed to disk (fsync), renamed, and its folder
flushed, so a reader never sees half a file and a crash or power cut leaves the old file or the new
one, whole. Manifest updates re-read the manifest under a lock, so concurrent commands adding
services to one store (`compute --n2g`, `explain`) never drop each other's entries.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sitegen import __version__
from sitegen.errors import DiskFull, StoreError
from sitegen.store.manifest import SCHEMA_VERSION, encode, validate_store, with_service

MANIFEST = "manifest.json"
WORK_DIR = ".work"
LOCK = ".manifest.lock"
MERGING = ".merging"
DICTIONARIES = "dictionaries"  # <store>/dictionaries/<name>/: one store per dictionary's latents


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)  # on Linux this flushes the inode's data whichever descriptor wrote it
    finally:
        os.close(fd)


def _make_dirs(folder: Path) -> None:
    """mkdir -p, flushing each new folder's entry in its parent (or a crash could lose the folder)."""
    if folder.is_dir():
        return
    _make_dirs(folder.parent)
    try:
        folder.mkdir()
    except FileExistsError:
        return
    _fsync(folder.parent, os.O_RDONLY | os.O_DIRECTORY)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp), flush tmp to disk, rename it over path and flush the folder: after a crash
    path holds the old bytes or the new ones, never an empty or partial file. A full disk becomes
    a StoreError naming the path."""
    tmp = None
    try:
        _make_dirs(path.parent)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise DiskFull(
                f"disk full while writing {path}; free space and rerun the same command (finished work is kept)", path
            ) from None
        raise StoreError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_table(path: Path, table: pa.Table) -> None:
    # Fixed writer options keep the bytes identical for identical data.
    # Page checksums: a flipped byte in a data page is then an error on read (see _read), not a wrong number on the site.
    atomic_write(
        path,
        lambda tmp: pq.write_table(
            table, tmp, compression="zstd", write_statistics=False, use_dictionary=False, write_page_checksum=True
        ),
    )


def _leaf_values(array: pa.Array) -> pa.Array:
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type):
        array = array.flatten()
    return array


def _float_leaves(array: pa.Array) -> list[pa.Array]:
    """The floating-point values of a column, however nested in lists and structs."""
    array = _leaf_values(array)
    if pa.types.is_struct(array.type):
        return [leaf for i in range(array.type.num_fields) for leaf in _float_leaves(array.field(i))]
    return [array] if pa.types.is_floating(array.type) else []


def _non_finite(value: Any, allow_inf: bool) -> Any:
    """The first NaN (or infinity, unless allowed) in a row's value, else None."""
    if isinstance(value, float):
        return value if value != value or (not allow_inf and value in (float("inf"), float("-inf"))) else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((bad for bad in (_non_finite(v, allow_inf) for v in items) if bad is not None), None)


def check_finite(path: Path, table: pa.Table, allow_inf: bool = False) -> None:
    """Refuse a table holding a NaN (or an infinity) in one line naming the file, column and row
    (by its `neuron` when it has one). Vectorised; rows are looked at only to name the first bad one."""
    for name, column in zip(table.column_names, table.columns):
        for chunk in column.chunks:
            for leaf in _float_leaves(chunk):
                bad = pc.is_nan(leaf) if allow_inf else pc.invert(pc.is_finite(leaf))
                if not pc.any(bad).as_py():
                    continue
                values = column.to_pylist()
                row = next(i for i, v in enumerate(values) if _non_finite(v, allow_inf) is not None)
                where = f"row {row}"
                try:  # name the neuron, also when the caller read other columns only
                    neurons = (
                        table.column("neuron")
                        if "neuron" in table.column_names
                        else pq.read_table(path, columns=["neuron"]).column("neuron")
                    )
                    where = f"neuron {neurons[row].as_py()}"
                except (OSError, KeyError, pa.ArrowException):
                    pass
                raise StoreError(
                    f"{path}: column '{name}' of {where} holds {_non_finite(values[row], allow_inf)}, not a finite number; "
                    "the store is damaged: recompute it (compute refuses activations that overflow)"
                )


class Store:
    """A store folder. Open an existing one with Store.open(); create one with Store(path)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self._manifest: dict | None = None
        self._sequence_tokens: dict | None = None

    # -- opening --
    @classmethod
    def open(cls, root: Path | str) -> "Store":
        store = cls(root)
        path = store.root / MANIFEST
        if not path.exists():
            if (store.root / MERGING).exists():
                try:
                    command = orjson.loads((store.root / MERGING).read_bytes())["command"]
                except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
                    command = f"sitegen merge SHARD... --out {store.root}"
                raise StoreError(f"{store.root} is an unfinished 'sitegen merge' (interrupted); rerun it: {command}")
            if (store.root / WORK_DIR).exists():
                raise StoreError(
                    f"{store.root} is an unfinished compute run; rerun the same 'sitegen compute' command to finish it"
                )
            raise StoreError(
                f"{store.root} is not a sitegen store (no {MANIFEST}); run 'sitegen compute --out {store.root}' first"
            )
        manifest = store._read_manifest()
        validate_store(
            store.root, manifest
        )  # the manifest's fields and the files' footers, one line on the first fault
        store._manifest = manifest
        return store

    def _read_manifest(self) -> dict:
        path = self.root / MANIFEST
        try:
            manifest = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError) as e:
            raise StoreError(f"{path}: unreadable manifest ({e}); recompute the store") from None
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{self.root} has store schema {version}, this sitegen reads {SCHEMA_VERSION}; recompute it with this version"
            )
        return manifest

    @contextmanager
    def _manifest_lock(self) -> Iterator[None]:
        """Exclusive lock for a manifest update (blocking: an update takes milliseconds). The lock
        file stays: deleting it would let a waiting process lock a file nobody else sees."""
        try:
            _make_dirs(self.root)
            f = open(self.root / LOCK, "a")
        except OSError as e:
            raise StoreError(f"cannot lock {self.root / LOCK}: {e.strerror or e}") from None
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield  # closing the file releases the lock (and a killed process's lock is released by the kernel)

    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            raise StoreError(f"{self.root}: store not opened")
        return self._manifest

    @property
    def exists(self) -> bool:
        return (self.root / MANIFEST).exists()

    @property
    def work_dir(self) -> Path:
        return self.root / WORK_DIR

    # -- layout --
    def dictionary_root(self, name: str) -> Path:
        """Where the store of dictionary NAME's latents lives (a store of its own)."""
        return self.root / DICTIONARIES / name

    def dictionary_stores(self) -> list["Store"]:
        """The stores of the dictionaries this store's corpus pass computed (its manifest's
        `dictionaries`), opened and checked, in the manifest's order."""
        return [Store.open(self.dictionary_root(name)) for name in self.manifest.get("dictionaries", [])]

    def layer_path(self, service: str, layer: int) -> Path:
        return self.root / service / f"layer={layer}" / "data.parquet"

    def has_service(self, service: str) -> bool:
        return service in self.manifest.get("services", [])

    # -- reading --
    def _read(self, path: Path, columns: list[str] | None = None, allow_inf: bool = False) -> pa.Table:
        try:
            table = pq.read_table(path, columns=columns, page_checksum_verification=True)
        except FileNotFoundError:
            raise StoreError(f"{path} is missing from the store; recompute it") from None
        except (OSError, pa.ArrowException) as e:
            raise StoreError(f"{path}: unreadable ({e}); recompute the store") from None
        check_finite(path, table, allow_inf)
        return table

    def read_layer(
        self, service: str, layer: int, columns: list[str] | None = None, allow_inf: bool = False
    ) -> pa.Table:
        """One layer's table. Every float in it is finite, or a StoreError names the file, column and
        neuron (compute never stores a NaN or an infinity: a JSON API cannot carry one). `allow_inf`:
        merge reads shards whose empty neurons keep +-inf as the identity of min and max."""
        return self._read(self.layer_path(service, layer), columns, allow_inf)

    def vocab(self) -> list[str]:
        return self._read(self.root / "vocab.parquet").column("token").to_pylist()

    def sequences(self) -> pa.Table:
        return self._read(self.root / "sequences.parquet")

    def sequence_tokens(self) -> dict[int, Any]:
        """seq_id -> its token ids (a numpy int32 array), read once per Store object."""
        if self._sequence_tokens is None:
            seqs = self.sequences()
            col = seqs.column("token_ids").combine_chunks()
            offsets, values = col.offsets.to_numpy(), col.values.to_numpy()
            self._sequence_tokens = {
                int(s): values[offsets[i] : offsets[i + 1]] for i, s in enumerate(seqs.column("seq_id").to_numpy())
            }
        return self._sequence_tokens

    # -- writing (compute and merge) --
    def write_layer(self, service: str, layer: int, table: pa.Table) -> None:
        write_table(self.layer_path(service, layer), table)

    def write_vocab(self, tokens: list[str]) -> None:
        write_table(
            self.root / "vocab.parquet",
            pa.table({"token_id": pa.array(range(len(tokens)), pa.int32()), "token": pa.array(tokens, pa.string())}),
        )

    def write_sequences(self, table: pa.Table) -> None:
        write_table(self.root / "sequences.parquet", table)

    def add_service(self, service: str, record: dict | None = None) -> None:
        """List a service in the manifest of an existing store (and keep `record` under its name);
        written only when something changes. Reads the manifest afresh under the store's lock, so
        another command's update since this Store was opened is kept, not overwritten."""
        with self._manifest_lock():
            current = self._read_manifest()
            manifest = with_service(current, service, record)
            if manifest is not None:
                self._write_manifest(manifest)
            else:
                self._manifest = current

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Write a whole manifest (a new store: compute, merge; built by sitegen.store.manifest's
        new_manifest / merged_manifest); an existing one is replaced."""
        with self._manifest_lock():
            self._write_manifest(manifest)

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest, data = encode(self.root / MANIFEST, manifest, __version__)
        atomic_write_bytes(self.root / MANIFEST, data)
        self._manifest = manifest


SEQUENCES_SCHEMA = pa.schema(
    [
        ("seq_id", pa.int64()),
        ("doc_id", pa.string()),
        ("char_start", pa.int64()),
        ("char_end", pa.int64()),
        ("token_ids", pa.list_(pa.int32())),
    ]
)

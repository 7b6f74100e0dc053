"""The Parquet store: the one hand-off between compute and build. Only this package knows the layout.

    STORE/
      manifest.json                  written last: its presence marks a complete store
      vocab.parquet                  token_id, token (display string)
      sequences.parquet              seq_id, doc_id, char_start, char_end, token_ids
      <service>/layer=<L>/data.parquet   one row per neuron of layer L
      .work/                         checkpoints of an unfinished run (removed when it finishes)

Every file is written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from sitegen import __version__
from sitegen.errors import StoreError
from sitegen.store.manifest import validate_store

SCHEMA_VERSION = 2  # 2: squares as two limbs (sumsq_lo), variable-width display histogram (hist_edges)
MANIFEST = "manifest.json"
WORK_DIR = ".work"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) and rename tmp over path. A full disk becomes a StoreError naming the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise StoreError(f"disk full while writing {path}; free space and rerun the same command (finished work is kept)") from None
        raise StoreError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_table(path: Path, table: pa.Table) -> None:
    # Fixed writer options keep the bytes identical for identical data.
    # Page checksums: a flipped byte in a data page is then an error on read (see _read), not a wrong number on the site.
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd", write_statistics=False, use_dictionary=False,
                                                  write_page_checksum=True))


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
            if (store.root / WORK_DIR).exists():
                raise StoreError(f"{store.root} is an unfinished compute run; rerun the same 'sitegen compute' command to finish it")
            raise StoreError(f"{store.root} is not a sitegen store (no {MANIFEST}); run 'sitegen compute --out {store.root}' first")
        try:
            manifest = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError) as e:
            raise StoreError(f"{path}: unreadable manifest ({e}); recompute the store") from None
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        if version != SCHEMA_VERSION:
            raise StoreError(f"{store.root} has store schema {version}, this sitegen reads {SCHEMA_VERSION}; recompute it with this version")
        validate_store(store.root, manifest)  # the manifest's fields and the files' footers, one line on the first fault
        store._manifest = manifest
        return store

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
    def layer_path(self, service: str, layer: int) -> Path:
        return self.root / service / f"layer={layer}" / "data.parquet"

    def has_service(self, service: str) -> bool:
        return service in self.manifest.get("services", [])

    # -- reading --
    def _read(self, path: Path, columns: list[str] | None = None) -> pa.Table:
        try:
            return pq.read_table(path, columns=columns, page_checksum_verification=True)
        except FileNotFoundError:
            raise StoreError(f"{path} is missing from the store; recompute it") from None
        except (OSError, pa.ArrowException) as e:
            raise StoreError(f"{path}: unreadable ({e}); recompute the store") from None

    def read_layer(self, service: str, layer: int, columns: list[str] | None = None) -> pa.Table:
        return self._read(self.layer_path(service, layer), columns)

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
            self._sequence_tokens = {int(s): values[offsets[i]:offsets[i + 1]] for i, s in enumerate(seqs.column("seq_id").to_numpy())}
        return self._sequence_tokens

    # -- writing (compute and merge) --
    def write_layer(self, service: str, layer: int, table: pa.Table) -> None:
        write_table(self.layer_path(service, layer), table)

    def write_vocab(self, tokens: list[str]) -> None:
        write_table(self.root / "vocab.parquet", pa.table({"token_id": pa.array(range(len(tokens)), pa.int32()), "token": pa.array(tokens, pa.string())}))

    def write_sequences(self, table: pa.Table) -> None:
        write_table(self.root / "sequences.parquet", table)

    def add_service(self, service: str, record: dict | None = None) -> None:
        """List a service in the manifest of an existing store (and keep `record` under its name);
        written only when something changes."""
        manifest = {k: v for k, v in self.manifest.items() if k not in ("schema_version", "sitegen_version")}
        changed = service not in manifest.get("services", [])
        if changed:
            manifest["services"] = [*manifest.get("services", []), service]
        if record is not None and manifest.get(service) != record:
            manifest[service] = record
            changed = True
        if changed:
            self.write_manifest(manifest)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest = {**manifest, "schema_version": SCHEMA_VERSION, "sitegen_version": __version__}
        atomic_write_bytes(self.root / MANIFEST, orjson.dumps(manifest, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2))
        self._manifest = manifest


SEQUENCES_SCHEMA = pa.schema([
    ("seq_id", pa.int64()),
    ("doc_id", pa.string()),
    ("char_start", pa.int64()),
    ("char_end", pa.int64()),
    ("token_ids", pa.list_(pa.int32())),
])

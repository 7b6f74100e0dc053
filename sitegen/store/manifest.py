"""The store manifest's schema, and the cheap checks of the store's files against it.

`validate_store` runs whenever a store is opened (Store.open). A hand-edited or damaged store
then fails there with one line naming the file and the field at fault and what to do, instead
of a KeyError or IndexError deep inside build, merge or explain, or, worse, a silently smaller
site (a smaller `layer_size` would drop neurons without a word).

What is checked:
- manifest.json against the typed schema below (pydantic, strict: `"4"` is not a number). Only
  the fields some reader needs are required; unknown fields (versions, records no service
  declares a type for) are kept as they are.
- each listed service's manifest records (the fields its compute writes, e.g. the statistics'
  binning) against the types the service declares (`Record` subclasses).
- each Parquet file's footer (cheap: no data pages are read): it is readable, has the columns
  its readers use (a service's: every column of its declared table schema, of the declared
  type), and a layer of a service with `complete` tables has exactly `layer_size`
  rows; every layer such a service needs is there, and no layer lies beyond `num_layers`.
- every token id the store holds (sequences.parquet's `token_ids`, a service's
  `store_token_columns`) is an id of vocab.parquet: 0 <= id < its rows. This one reads data pages
  (only those columns): an id of 10^6 would crash the build, and -1 would show the last token.

What a service's part of the store must hold is the service's own knowledge (its
`table_schema`, `complete_layers`, `always_stored` and `manifest_schemas`,
sitegen/services/base.py). The store sits below the services (it may not import them), so the
services package hands their `ServiceSpec`s in: `set_service_specs` (sitegen/services/__init__.py
calls it on import). A service no registered one describes (or any, before the services are
imported, or one declaring no schema) gets the generic check: a `neuron` column and at most
`layer_size` rows.

Data pages are read later, by the readers; a damaged one is a StoreError there (Store._read).
No torch and no import of the rest of sitegen.store (this module is imported by it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sitegen.errors import StoreError
from sitegen.names import model_name_problem

_RECOMPUTE = "recompute the store (or restore the file from a copy)"
_SERVICE_NAME = re.compile(r"[a-z][a-z0-9_]*")


class Record(BaseModel):
    """Base of every typed part of the manifest, sitegen's own and the records services declare
    (`Service.manifest_schemas`): strict, no "4" -> 4 or true -> 1 coercion; extra="allow": keep
    fields this sitegen does not read."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


class ModelInfo(Record):
    name: str
    num_layers: int = Field(ge=1)
    layer_size: int = Field(ge=1)
    activation_function: str
    num_total_parameters: int = Field(ge=0)
    vocab_size: Optional[int] = Field(default=None, ge=1)
    source: Optional[str] = None
    source_kind: Optional[Literal["embedded", "hub", "local"]] = None  # None: not recorded (an older store)

    @field_validator("name")
    @classmethod
    def _url_safe(cls, name: str) -> str:
        # Shape only (the model's name is a URL segment); names the site reserves are the build's concern.
        problem = model_name_problem(name, reserved=())
        if problem:
            raise ValueError(problem)
        return name


class CorpusInfo(Record):
    name: str
    source: Optional[str] = None
    source_kind: Optional[Literal["embedded", "hub", "local"]] = None


class Processed(Record):
    sequences: int = Field(ge=0)
    tokens: int = Field(ge=0)


class RunConfig(Record):
    seq_len: int = Field(ge=1)
    seed: int
    tokens: int = Field(ge=1)
    top_k: int = Field(ge=1)
    n_random: int = Field(ge=0)
    bos_token_id: Optional[int] = None
    first_valid_position: int = Field(ge=0, le=1)  # 1 when each sequence starts with BOS


class Shard(Record):
    index: int = Field(ge=0)
    count: int = Field(ge=2)

    @model_validator(mode="after")
    def _in_range(self) -> "Shard":
        if self.index >= self.count:
            raise ValueError(f"index {self.index} is not below count {self.count}")
        return self


class DictionaryInfo(Record):
    """The `dictionary` record of a dictionary's store (sitegen/dictionaries/units.py writes it)."""

    name: str
    sha256: str
    architecture: str
    transcoder: bool
    hook_name: str
    hook_out: Optional[str] = None
    layer: int = Field(ge=0)
    d_in: int = Field(ge=1)
    d_sae: int = Field(ge=1)
    base_model: str
    sums: Optional[dict] = None
    quality: Optional[dict] = None


class Manifest(Record):
    """manifest.json, typed. Store.manifest stays the plain dict (every reader indexes it)."""

    schema_version: int
    model: ModelInfo
    corpus: CorpusInfo
    processed: Processed
    config: RunConfig
    run_hash: str
    shard: Optional[Shard]
    services: list[str]
    publish_source: Optional[bool] = None  # compute --publish-source: the site shows local source paths as given
    dictionaries: Optional[list[str]] = None  # compute --sae: the dictionaries' stores, <store>/dictionaries/<name>/
    dictionary: Optional[DictionaryInfo] = None  # a dictionary's store: what it is and its quality

    @field_validator("dictionaries")
    @classmethod
    def _dictionary_names(cls, names: list[str] | None) -> list[str] | None:
        for name in names or ():  # each is a folder of the store: nothing that could leave it
            if problem := model_name_problem(name, reserved=()):
                raise ValueError(f"{name!r}: {problem}")
        return names

    @field_validator("services")
    @classmethod
    def _services(cls, services: list[str]) -> list[str]:
        for s in services:  # a service name is a folder of the store: nothing that could leave it
            if not _SERVICE_NAME.fullmatch(s):
                raise ValueError(f"{s!r} is not a service name")
        if len(set(services)) != len(services):
            raise ValueError("lists a service twice")
        return services


@dataclass(frozen=True)
class ServiceSpec:
    """What one service's part of a store must hold (declared by the service: sitegen/services/base.py)."""

    # its layer table's declared columns and types (Service.table_schema), which its writers and
    # readers (compute, merge, build, explain, search) use; None: a `neuron` column, of any type
    schema: pa.Schema | None = None
    complete: bool = False  # one row per neuron in every layer; else some neurons of some layers
    required: bool = False  # every store lists the service
    token_columns: tuple[str, ...] = ()  # columns of token ids (lists of ints), each must index vocab.parquet
    records: tuple[tuple[str, type[Record]], ...] = ()  # manifest fields its compute writes, and their types

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.schema.names) if self.schema is not None else ("neuron",)


GENERIC_SERVICE = ServiceSpec()
_service_specs: Callable[[], Mapping[str, ServiceSpec]] = dict


def set_service_specs(provider: Callable[[], Mapping[str, ServiceSpec]]) -> None:
    """Install what validate_store checks each service's part against: service name -> ServiceSpec,
    asked on every open (so a registry reloaded in tests is seen)."""
    global _service_specs
    _service_specs = provider


def service_specs() -> Mapping[str, ServiceSpec]:
    return _service_specs()


SEQUENCES_COLUMNS = ("seq_id", "doc_id", "char_start", "char_end", "token_ids")
VOCAB_COLUMNS = ("token_id", "token")


def _field(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _invalid(path: Path, e: ValidationError, prefix: tuple = ()) -> StoreError:
    """One line naming the file, the first wrong field (under `prefix`, the field it was read from) and the fix."""
    err = e.errors()[0]
    field = _field((*prefix, *err["loc"]))
    if err["type"] == "missing":
        what = "is missing"
    else:
        msg = err["msg"].removeprefix("Value error, ")
        what = f"is {_shown(err.get('input'))}: {msg}"
    more = f" ({e.error_count() - 1} more problem(s))" if e.error_count() > 1 else ""
    return StoreError(f"{path}: field '{field}' {what}{more}; fix that field or {_RECOMPUTE}")


def parse_manifest(path: Path, data: Any) -> Manifest:
    """The typed manifest, or a StoreError naming the file, the first wrong field and the fix."""
    if not isinstance(data, dict):
        raise StoreError(f"{path}: not a JSON object; {_RECOMPUTE}")
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        raise _invalid(path, e) from None


def _footer(path: Path, columns: tuple[str, ...], schema: pa.Schema | None = None) -> pq.FileMetaData:
    """A Parquet file's footer, checked for the columns its readers use and, where `schema`
    declares them, their types (so a reader never meets another type than its writer made)."""
    try:
        meta = pq.read_metadata(path)
        stored: dict[str, pa.DataType] = {}
        for f in meta.schema.to_arrow_schema():
            stored.setdefault(f.name, f.type)
    except FileNotFoundError:
        raise StoreError(f"{path} is missing from the store; {_RECOMPUTE}") from None
    except (OSError, ValueError, pa.ArrowException) as e:  # ValueError: a damaged footer's strings are not UTF-8
        raise StoreError(f"{path}: damaged Parquet file ({' '.join(str(e).split())[:120]}); {_RECOMPUTE}") from None
    missing = [c for c in columns if c not in stored]
    if missing:
        raise StoreError(f"{path}: damaged table, column(s) {', '.join(missing)} missing; {_RECOMPUTE}")
    for field in schema or ():
        if not stored[field.name].equals(field.type):
            raise StoreError(
                f"{path}: damaged table, column '{field.name}' holds {stored[field.name]}, not the declared "
                f"{field.type}; {_RECOMPUTE}"
            )
    return meta


def _check_token_ids(path: Path, columns: tuple[str, ...], n_vocab: int, key: str) -> None:
    """Every value of `columns` (ints or lists of ints) of the table at `path` is a row of
    vocab.parquet; else one line naming the file, the column, the row (by `key`) and the id."""
    try:
        table = pq.read_table(path, columns=[key, *columns], page_checksum_verification=True)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise StoreError(f"{path}: damaged Parquet file ({' '.join(str(e).split())[:120]}); {_RECOMPUTE}") from None
    for name in columns:
        column = table.column(name)
        values = column.combine_chunks()
        while pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
            values = values.flatten()
        if not pa.types.is_integer(values.type):
            raise StoreError(f"{path}: damaged table, column '{name}' holds {values.type}, not token ids; {_RECOMPUTE}")
        if len(values) == 0 or values.null_count == len(values):
            continue
        lo, hi = (v.as_py() for v in pc.min_max(values).values())
        if lo >= 0 and hi < n_vocab:
            continue
        for k, row in zip(table.column(key).to_pylist(), column.to_pylist()):  # the first bad row, to name it
            ids = row if isinstance(row, list) else [row]
            bad = next((i for i in _leaves(ids) if i is not None and not 0 <= i < n_vocab), None)
            if bad is not None:
                raise StoreError(
                    f"{path}: column '{name}' of {key} {k} holds token id {bad}, outside the vocabulary "
                    f"(vocab.parquet has ids 0 to {n_vocab - 1}); {_RECOMPUTE}"
                )


def _leaves(items: list) -> list:
    out = []
    for item in items:
        out.extend(_leaves(item) if isinstance(item, list) else [item])
    return out


def _check_services(path: Path, m: Manifest, data: dict, specs: Mapping[str, ServiceSpec]) -> None:
    """Every required service listed, and the manifest records of each listed one of its declared types."""
    for name, spec in specs.items():
        if spec.required and name not in m.services:
            raise StoreError(
                f"{path}: field 'services' is {_shown(m.services)}: must list {name!r} (every store has it); "
                f"fix that field or {_RECOMPUTE}"
            )
    for name in m.services:
        for key, record in specs.get(name, GENERIC_SERVICE).records:
            if key not in data:
                raise StoreError(
                    f"{path}: field '{key}' is missing (service {name!r} records it); fix that field or {_RECOMPUTE}"
                )
            try:
                record.model_validate(data[key])
            except ValidationError as e:
                raise _invalid(path, e, (key,)) from None


def validate_store(root: Path, data: Any) -> Manifest:
    """Check manifest.json and the store's Parquet footers against each other (see the module doc)."""
    path = root / "manifest.json"
    m = parse_manifest(path, data)
    specs = service_specs()
    _check_services(path, m, data, specs)
    size, n_layers = m.model.layer_size, m.model.num_layers
    vocab = _footer(root / "vocab.parquet", VOCAB_COLUMNS)
    if m.model.vocab_size is not None and vocab.num_rows != m.model.vocab_size:
        raise StoreError(
            f"{path}: field 'model.vocab_size' is {m.model.vocab_size} but vocab.parquet has {vocab.num_rows} tokens; "
            f"fix that field or {_RECOMPUTE}"
        )
    _footer(root / "sequences.parquet", SEQUENCES_COLUMNS)
    _check_token_ids(root / "sequences.parquet", ("token_ids",), vocab.num_rows, "seq_id")
    for service in m.services:
        folder = root / service
        spec = specs.get(service, GENERIC_SERVICE)
        for layer_dir in sorted(folder.glob("layer=*")) if folder.is_dir() else ():
            layer = layer_dir.name.removeprefix("layer=")
            if not layer.isdigit() or int(layer) >= n_layers:
                raise StoreError(
                    f"{path}: field 'model.num_layers' is {n_layers} but the store holds {layer_dir}; "
                    f"fix that field or {_RECOMPUTE}"
                )
        for layer in range(n_layers):
            table = folder / f"layer={layer}" / "data.parquet"
            if not table.exists():
                if not spec.complete:
                    continue
                raise StoreError(
                    f"{table} is missing, but {path} lists service '{service}' and field 'model.num_layers' is {n_layers}; "
                    f"fix that field or {_RECOMPUTE}"
                )
            rows = _footer(table, spec.columns, spec.schema).num_rows
            if (rows != size) if spec.complete else (rows > size):
                raise StoreError(
                    f"{path}: field 'model.layer_size' is {size} but {table} has {rows} rows (one per neuron); "
                    f"fix that field or {_RECOMPUTE}"
                )
            if spec.token_columns:
                _footer(table, spec.token_columns)
                _check_token_ids(table, spec.token_columns, vocab.num_rows, "neuron")
    return m


# --- Building and encoding: the one place a manifest is made ---------------------------------------

SCHEMA_VERSION = 2  # 2: squares as two limbs (sumsq_lo), variable-width display histogram (hist_edges)
_STAMPS = ("schema_version", "sitegen_version")  # written by encode(), never carried over from a read manifest


def new_manifest(
    *,
    model: dict,
    corpus: dict,
    processed: dict,
    config: dict,
    run_hash: str,
    shard: dict | None,
    services: list[str],
    **records: Any,
) -> dict:
    """A whole store's manifest (compute, merge, synthetic test stores). `records`: per-service
    or provenance records kept as they are (the services' `manifest_records`, identity, versions, ...)."""
    return {
        "model": model,
        "corpus": corpus,
        "processed": processed,
        "config": config,
        "run_hash": run_hash,
        "shard": shard,
        "services": list(services),
        **records,
    }


def merged_manifest(manifests: list[dict], services: list[str]) -> dict:
    """The manifest of a merged store: the first shard's, as a whole store, with every shard's work summed."""
    first = {k: v for k, v in manifests[0].items() if k not in _STAMPS}
    return {
        **first,
        "shard": None,
        "services": list(services),
        "processed": {
            "sequences": sum(m["processed"]["sequences"] for m in manifests),
            "tokens": sum(m["processed"]["tokens"] for m in manifests),
        },
    }


def with_service(current: dict, service: str, record: dict | None = None) -> dict | None:
    """`current` with `service` listed (and `record` kept under its name); None when nothing changes."""
    manifest = {k: v for k, v in current.items() if k not in _STAMPS}
    changed = service not in manifest.get("services", [])
    if changed:
        manifest["services"] = [*manifest.get("services", []), service]
    if record is not None and manifest.get(service) != record:
        manifest[service] = record
        changed = True
    return manifest if changed else None


def encode(path: Path, manifest: dict, sitegen_version: str) -> tuple[dict, bytes]:
    """The stamped manifest and its bytes, checked against the schema first: sitegen never writes
    a manifest it would refuse to open."""
    stamped = {
        **{k: v for k, v in manifest.items() if k not in _STAMPS},
        "schema_version": SCHEMA_VERSION,
        "sitegen_version": sitegen_version,
    }
    _check_services(path, parse_manifest(path, stamped), stamped, service_specs())
    return stamped, orjson.dumps(stamped, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)

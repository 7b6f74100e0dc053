"""The store manifest's schema, and the cheap checks of the store's files against it.

`validate_store` runs whenever a store is opened (Store.open). A hand-edited or damaged store
then fails there with one line naming the file and the field at fault and what to do, instead
of a KeyError or IndexError deep inside build, merge or explain, or, worse, a silently smaller
site (a smaller `layer_size` used to drop neurons without a word).

What is checked:
- manifest.json against the typed schema below (pydantic, strict: `"4"` is not a number). Only
  the fields some reader needs are required; unknown fields (service records such as
  `neuron2graph`, versions) are kept as they are.
- each Parquet file's footer (cheap: no data pages are read): it is readable, has the columns
  its readers use, and a layer of a service with `complete` tables has exactly `layer_size`
  rows; every layer such a service needs is there, and no layer lies beyond `num_layers`.

What a service's tables must hold is the service's own knowledge (its `store_columns`,
`complete_layers` and `always_stored`, sitegen/services/base.py). The store sits below the
services (it may not import them), so the services package hands their `TableSpec`s in:
`set_table_specs` (sitegen/services/__init__.py calls it on import). A service no registered
one describes (or any, before the services are imported) gets the generic check: a `neuron`
column and at most `layer_size` rows.

Data pages are read later, by the readers; a damaged one is a StoreError there (Store._read).
No torch and no import of the rest of sitegen.store (this module is imported by it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sitegen.errors import StoreError
from sitegen.names import model_name_problem

_RECOMPUTE = "recompute the store (or restore the file from a copy)"
_SERVICE_NAME = re.compile(r"[a-z][a-z0-9_]*")


class _Strict(BaseModel):
    # strict: no "4" -> 4 or true -> 1 coercion; extra="allow": keep fields this sitegen does not read.
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


class ModelInfo(_Strict):
    name: str
    num_layers: int = Field(ge=1)
    layer_size: int = Field(ge=1)
    activation_function: str
    num_total_parameters: int = Field(ge=0)
    vocab_size: Optional[int] = Field(default=None, ge=1)
    source: Optional[str] = None

    @field_validator("name")
    @classmethod
    def _url_safe(cls, name: str) -> str:
        # Shape only (the model's name is a URL segment); names the site reserves are the build's concern.
        problem = model_name_problem(name, reserved=())
        if problem:
            raise ValueError(problem)
        return name


class CorpusInfo(_Strict):
    name: str


class Processed(_Strict):
    sequences: int = Field(ge=0)
    tokens: int = Field(ge=0)


class RunConfig(_Strict):
    seq_len: int = Field(ge=1)
    seed: int
    tokens: int = Field(ge=1)
    top_k: int = Field(ge=1)
    n_random: int = Field(ge=0)
    bos_token_id: Optional[int] = None
    first_valid_position: int = Field(ge=0, le=1)  # 1 when each sequence starts with BOS


class StatsInfo(_Strict):
    quantile_levels: list[float] = Field(min_length=1)
    display_bins: int = Field(ge=1)

    @field_validator("quantile_levels")
    @classmethod
    def _levels(cls, levels: list[float]) -> list[float]:
        if any(not 0 < q < 1 for q in levels) or any(a >= b for a, b in zip(levels, levels[1:])):
            raise ValueError("must be increasing fractions between 0 and 1")
        return levels


class Shard(_Strict):
    index: int = Field(ge=0)
    count: int = Field(ge=2)

    @model_validator(mode="after")
    def _in_range(self) -> "Shard":
        if self.index >= self.count:
            raise ValueError(f"index {self.index} is not below count {self.count}")
        return self


class Manifest(_Strict):
    """manifest.json, typed. Store.manifest stays the plain dict (every reader indexes it)."""

    schema_version: int
    model: ModelInfo
    corpus: CorpusInfo
    processed: Processed
    config: RunConfig
    stats: StatsInfo
    run_hash: str
    shard: Optional[Shard]
    services: list[str]

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
class TableSpec:
    """What one service's layer tables must hold (declared by the service: sitegen/services/base.py)."""

    columns: tuple[str, ...] = ("neuron",)  # the columns its readers (build, merge, explain, search) use
    complete: bool = False  # one row per neuron in every layer; else some neurons of some layers
    required: bool = False  # every store lists the service


GENERIC_TABLE = TableSpec()
_table_specs: Callable[[], Mapping[str, TableSpec]] = dict


def set_table_specs(provider: Callable[[], Mapping[str, TableSpec]]) -> None:
    """Install what validate_store checks each service's tables against: service name -> TableSpec,
    asked on every open (so a registry reloaded in tests is seen)."""
    global _table_specs
    _table_specs = provider


def table_specs() -> Mapping[str, TableSpec]:
    return _table_specs()


SEQUENCES_COLUMNS = ("seq_id", "doc_id", "char_start", "char_end", "token_ids")
VOCAB_COLUMNS = ("token_id", "token")


def _field(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_manifest(path: Path, data: Any) -> Manifest:
    """The typed manifest, or a StoreError naming the file, the first wrong field and the fix."""
    if not isinstance(data, dict):
        raise StoreError(f"{path}: not a JSON object; {_RECOMPUTE}")
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = _field(err["loc"])
        if err["type"] == "missing":
            what = "is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            what = f"is {_shown(err.get('input'))}: {msg}"
        more = f" ({e.error_count() - 1} more problem(s))" if e.error_count() > 1 else ""
        raise StoreError(f"{path}: field '{field}' {what}{more}; fix that field or {_RECOMPUTE}") from None


def _footer(path: Path, columns: tuple[str, ...]) -> pq.FileMetaData:
    """A Parquet file's footer, checked for the columns its readers use."""
    try:
        meta = pq.read_metadata(path)
        names = set(meta.schema.to_arrow_schema().names)
    except FileNotFoundError:
        raise StoreError(f"{path} is missing from the store; {_RECOMPUTE}") from None
    except (OSError, ValueError, pa.ArrowException) as e:  # ValueError: a damaged footer's strings are not UTF-8
        raise StoreError(f"{path}: damaged Parquet file ({' '.join(str(e).split())[:120]}); {_RECOMPUTE}") from None
    missing = [c for c in columns if c not in names]
    if missing:
        raise StoreError(f"{path}: damaged table, column(s) {', '.join(missing)} missing; {_RECOMPUTE}")
    return meta


def _check_required(path: Path, services: list[str], specs: Mapping[str, TableSpec]) -> None:
    for name, spec in specs.items():
        if spec.required and name not in services:
            raise StoreError(f"{path}: field 'services' is {_shown(services)}: must list {name!r} (every store has it); "
                             f"fix that field or {_RECOMPUTE}")


def validate_store(root: Path, data: Any) -> Manifest:
    """Check manifest.json and the store's Parquet footers against each other (see the module doc)."""
    path = root / "manifest.json"
    m = parse_manifest(path, data)
    specs = table_specs()
    _check_required(path, m.services, specs)
    size, n_layers = m.model.layer_size, m.model.num_layers
    vocab = _footer(root / "vocab.parquet", VOCAB_COLUMNS)
    if m.model.vocab_size is not None and vocab.num_rows != m.model.vocab_size:
        raise StoreError(f"{path}: field 'model.vocab_size' is {m.model.vocab_size} but vocab.parquet has {vocab.num_rows} tokens; "
                         f"fix that field or {_RECOMPUTE}")
    _footer(root / "sequences.parquet", SEQUENCES_COLUMNS)
    for service in m.services:
        folder = root / service
        spec = specs.get(service, GENERIC_TABLE)
        for layer_dir in sorted(folder.glob("layer=*")) if folder.is_dir() else ():
            layer = layer_dir.name.removeprefix("layer=")
            if not layer.isdigit() or int(layer) >= n_layers:
                raise StoreError(f"{path}: field 'model.num_layers' is {n_layers} but the store holds {layer_dir}; "
                                 f"fix that field or {_RECOMPUTE}")
        for layer in range(n_layers):
            table = folder / f"layer={layer}" / "data.parquet"
            if not table.exists():
                if not spec.complete:
                    continue
                raise StoreError(f"{table} is missing, but {path} lists service '{service}' and field 'model.num_layers' is {n_layers}; "
                                 f"fix that field or {_RECOMPUTE}")
            rows = _footer(table, spec.columns).num_rows
            if (rows != size) if spec.complete else (rows > size):
                raise StoreError(f"{path}: field 'model.layer_size' is {size} but {table} has {rows} rows (one per neuron); "
                                 f"fix that field or {_RECOMPUTE}")
    return m


# --- Building and encoding: the one place a manifest is made ---------------------------------------

SCHEMA_VERSION = 2  # 2: squares as two limbs (sumsq_lo), variable-width display histogram (hist_edges)
_STAMPS = ("schema_version", "sitegen_version")  # written by encode(), never carried over from a read manifest


def new_manifest(*, model: dict, corpus: dict, processed: dict, config: dict, stats: dict, run_hash: str, shard: dict | None,
                 services: list[str], **records: Any) -> dict:
    """A whole store's manifest (compute, merge, synthetic test stores). `records`: per-service
    or provenance records kept as they are (identity, versions, neuron2graph, ...)."""
    return {"model": model, "corpus": corpus, "processed": processed, "config": config, "stats": stats,
            "run_hash": run_hash, "shard": shard, "services": list(services), **records}


def merged_manifest(manifests: list[dict], services: list[str]) -> dict:
    """The manifest of a merged store: the first shard's, as a whole store, with every shard's work summed."""
    first = {k: v for k, v in manifests[0].items() if k not in _STAMPS}
    return {**first, "shard": None, "services": list(services),
            "processed": {"sequences": sum(m["processed"]["sequences"] for m in manifests),
                          "tokens": sum(m["processed"]["tokens"] for m in manifests)}}


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
    stamped = {**{k: v for k, v in manifest.items() if k not in _STAMPS}, "schema_version": SCHEMA_VERSION, "sitegen_version": sitegen_version}
    _check_required(path, parse_manifest(path, stamped).services, table_specs())
    return stamped, orjson.dumps(stamped, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)

"""The contract between sitegen and a per-neuron service, and the helpers a service uses to
describe its part of the site. Every hook is a documented no-op by default, so a service
overrides only what it has. No torch here: the build imports this module.

A service is a subclass of `Service` (one instance registered under the `sitegen.services`
entry-point group; see sitegen/services/__init__.py). The build, merge, the compute runner, the
OpenAPI writer, `sitegen verify` and the templates ask services through these hooks and never
name one.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol

from markupsafe import Markup

if TYPE_CHECKING:
    import pyarrow as pa


class LayerView(Protocol):
    """A service's data for one layer, read once; answers per neuron."""

    def payload(
        self, neuron: int
    ) -> dict: ...  # the API's `data` (DeepDecipher's shape), ready for orjson (fragments allowed)
    def page(self, neuron: int) -> dict: ...  # the context of the service's template partial
    def layer_payload(self) -> dict: ...  # the layer's API `data`


@dataclass(frozen=True)
class Column:
    """A column a service adds to the layer table. `sort`: "number" (cells carry a data-v value),
    "text" (sorted by the cell's text) or None (not sortable)."""

    header: str
    sort: str | None = "number"


@dataclass(frozen=True)
class Cell:
    """One layer-table cell: escaped HTML and, for numeric columns, the sort value (data-v)."""

    html: Markup
    sort: str | None = None


def fmt_num(v, p: int = 4):
    """The site's number format (also the templates' `num` filter)."""
    return f"{v:.{p}g}" if isinstance(v, float) else v


def fmt_pct(v) -> str:
    """The site's fraction format (also the templates' `pct` filter)."""
    return f"{100 * v:.2f}%"


def number_cell(value, p: int = 4) -> Cell:
    return Cell(Markup.escape(fmt_num(value, p)), str(value))


@dataclass(frozen=True)
class CorpusRun:
    """What a service's corpus-pass hooks (`accumulator`, `merge_tables`) know about the run: the
    store's shape and the arguments `sitegen compute` was given (merge reads them back from the
    manifest). `seq_lengths`: the length of every sequence the tables may refer to (compute: this
    shard's; merge: every shard's stored ones)."""

    layer_size: int
    seq_len: int
    first_valid: int  # 1 when each sequence starts with BOS (position 0 is never counted)
    top_k: int
    n_random: int
    seed: int
    seq_lengths: Mapping[int, int] = field(default_factory=dict, repr=False)
    device: str = "cpu"  # compute only
    gated_mlp: bool = False  # compute only: the units are a gated MLP's neurons (each Batch has gate and up)
    # compute only: for a dictionary's latents, the neuron count of the model layer the dictionary
    # reads at (each Batch has that layer's neuron activations as `base`); 0 for neurons
    base_size: int = 0


@dataclass(frozen=True)
class Batch:
    """One fixed-shape batch of the corpus pass, as every layer's accumulator sees it (torch
    tensors on the run's device): `valid` bool [batch, seq], the counted positions (BOS and
    padding excluded); `seq_ids` int64 [batch], -1 for padding rows; `rand_score` float32
    [batch], -random_key(seed, seq_id) (-inf for padding rows); `interval_score` float32 [batch],
    -interval_key(seed, seq_id) (-inf for padding rows); `all_full`: every row is a real
    sequence of full length (so `valid` is just "position >= first_valid"). For a gated MLP's
    neurons (CorpusRun.gated_mlp), `gate` and `up` are the layer's two pre-activations [batch,
    seq, layer_size] (x . W_gate and x . W_in: the activation is act(gate) * up); else None. For a
    dictionary's latents (CorpusRun.base_size), `base` is the MLP activations of the model layer the
    dictionary reads at [batch, seq, base_size], the same tokens (so units of both kinds can be
    related); else None."""

    valid: Any
    seq_ids: Any
    rand_score: Any
    interval_score: Any
    all_full: bool = False
    gate: Any = None
    up: Any = None
    base: Any = None


@dataclass(frozen=True)
class TokenIndex:
    """A service's part of the model's site-wide token search (site/search.py writes the files):
    `postings`: token -> (sorted global ids of the neurons it activates, of those it is important
    to); `preview(global_id)` -> [top tokens, max activation, graph F1 or None, F1's interval or
    None], a search result's row (site/search.py puts the explanation after F1); `support`: token -> per neuron of its activating list, how many distinct
    sequences carry that token for it; `strength`: token -> per neuron of its activating list, how
    strongly it responds to the token (0 to 1; the search page ranks by it); `counts`: token -> its
    occurrences in the text counted, and `corpus` what was counted ({"sequences", "tokens",
    "processed"}), so a miss can say how often the token occurs."""

    postings: dict[str, tuple[list[int], list[int]]]
    preview: Callable[[int], list]
    support: dict[str, list[int]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    corpus: dict | None = None
    strength: dict[str, list[float]] = field(default_factory=dict)


def fnv1a(text: str) -> int:
    """32-bit FNV-1a of the UTF-8 bytes: the site's search files put a key in shard
    `fnv1a(key) % shards` (site/search.py writes them; the page's script, and an edge function
    that reads them, find a key the same way)."""
    h = 0x811C9DC5
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


# A read of the built site by an edge function's Python port: a decoded site path such as
# "/search/m/meta.json" -> the file's bytes, None when the site has no such file.
EdgeRead = Callable[[str], "bytes | None"]


@dataclass(frozen=True)
class EdgeResponse:
    """An edge function's answer: as on Netlify it carries only the headers the function sets
    (netlify.toml's [[headers]] do not apply to it)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True)
class EdgeFunction:
    """A Netlify Edge Function a service owns (hook `edge_functions`). `name`: netlify.toml's
    `function`, the module's file name without `.ts`; `path`: the route, netlify.toml's `path`
    (URLPattern: `*` any characters, `:name` one segment); `cache`: netlify.toml's `cache`
    ("manual": Netlify's CDN keeps the function's answers), or None; `source`: the Deno module,
    inside the service's own folder; `answer(raw_path, query_string, read)`: its Python port,
    which `sitegen serve` runs for a request on `path` (raw_path percent-encoded as sent; `read`
    an `EdgeRead`) and which must answer byte for byte as the module does."""

    name: str
    path: str
    source: Path
    answer: Callable[[str, str, EdgeRead], EdgeResponse]
    cache: str | None = None


@dataclass(frozen=True)
class VerifyRun:
    """What `sitegen verify` tells a service's verifier (hook `verifier`). `selection`: the neurons
    to check, {layer: sorted neuron ids} (--neurons; every service checks the same ones); `rtol`:
    the tolerance, a fraction of each neuron's largest |activation|; `full`: every stored
    sequence is rerun (else the sequences the verifiers ask for); `every_stored`: the store keeps
    every sequence the corpus pass processed, so with `full` the whole corpus pass is rerun and
    corpus-wide figures (statistics, counts) can be recomputed; `seq_tokens`: stored sequence id
    -> its token ids."""

    selection: Mapping[int, list[int]]
    rtol: float
    full: bool
    every_stored: bool
    seq_tokens: Mapping[int, Any] = field(default_factory=dict, repr=False)


@dataclass
class Verification:
    """One service's part of `sitegen verify`'s report, which joins every service's."""

    summary: str  # its part of the closing line, e.g. "144 neurons checked, 0 failed, ..."
    lines: list[str] = field(
        default_factory=list
    )  # its report lines (per layer, one per failing neuron: "  FAIL layer L neuron N: ...")
    failed: list[tuple[int, int]] = field(default_factory=list)  # (layer, neuron) of every neuron it found wrong
    notes: list[str] = field(default_factory=list)  # what it could not check, and why
    problems: list[str] = field(default_factory=list)  # store-level failures, not one neuron's
    data: dict = field(
        default_factory=dict
    )  # its top-level fields of the --json report (none sitegen's or another service's)


class Verifier(Protocol):
    """Checks one service's tables against the rerun model, fed by `sitegen verify`'s single
    forward pass (sitegen/compute/verify.py runs the batches; the verifier never sees the model)."""

    def sequences(
        self,
    ) -> Iterable[int]: ...  # the stored sequence ids it needs rerun (with run.full every stored one is)
    # acts: float32 numpy [rows, seq_len, len(selection[layer])], this layer's activations of the
    # selected neurons (in selection order) for the sequences seq_ids, right-padded: the first
    # lengths[row] positions are the sequence's tokens (BOS included). Every sequence run comes
    # through every selected layer once, also ones another verifier asked for. Read-only: every
    # verifier gets the same array.
    def update(self, layer: int, acts: Any, seq_ids: list[int], lengths: list[int]) -> None: ...
    def finish(self) -> Verification: ...


# --- OpenAPI helpers, shared by every service's schema -------------------------------------------------

METADATA_REF = "#/components/schemas/Metadata"
NEURON_INDEX_REF = "#/components/schemas/NeuronIndex"
LAYER_NEURON = ["model", "layer", "neuron"]


ERROR_REF = "#/components/schemas/ApiError"
# Every path parameter of the API, described once.
PARAMETERS = {
    "model": "The model's name, as listed at /api (Metadata.name).",
    "service": "A service name from the model's Metadata.available_services.",
    "layer": "Layer index, from 0 to the model's num_layers - 1.",
    "neuron": "Neuron index within the layer, from 0 to the model's layer_size - 1.",
}
NOT_FOUND = (
    "No such model, service, layer or neuron, or a service the model lacks (not in its "
    'Metadata.available_services): 404 with {"error": message}.'
)


def api_envelope(data_ref: str, what: str = "The service's data for this URL.") -> dict:
    """A response: {"data": <the payload at DATA_REF>, "metadata": <Metadata>}. WHAT describes data."""
    return {
        "type": "object",
        "required": ["data", "metadata"],
        "description": "DeepDecipher's envelope: the payload and the model's metadata.",
        "properties": {
            "data": {"$ref": data_ref, "description": what},
            "metadata": {"$ref": METADATA_REF, "description": "The model's metadata, as at /api/{model}."},
        },
    }


def api_get(summary: str, schema: dict, params: list[str], description: str | None = None) -> dict:
    """An OpenAPI GET operation with path parameters (model and service are strings, the rest
    integers) and the API's JSON 404. DESCRIPTION (default: SUMMARY) says what the answer holds."""
    return {
        "get": {
            "summary": summary,
            "description": description or summary,
            "parameters": [
                {
                    "name": p,
                    "in": "path",
                    "required": True,
                    "description": PARAMETERS[p],
                    "schema": {"type": "string" if p in ("model", "service") else "integer"},
                }
                for p in params
            ],
            "responses": {
                "200": {
                    "description": "OK (Access-Control-Allow-Origin: *)",
                    "content": {"application/json": {"schema": schema}},
                },
                "404": {"description": NOT_FOUND, "content": {"application/json": {"schema": {"$ref": ERROR_REF}}}},
            },
        }
    }


# The layer- and model-level answers of a service with no ranking of its own (Service.model_payload).
LAYER_COUNT = {
    "type": "object",
    "required": ["num_neurons"],
    "description": "The layer's size.",
    "properties": {"num_neurons": {"type": "integer", "description": "Neurons in the layer (the model's layer_size)."}},
}
MODEL_COUNT = {
    "type": "object",
    "required": ["num_layers"],
    "description": "The model's layer count (the service ranks no neurons).",
    "properties": {"num_layers": {"type": "integer", "description": "Layers of the model (Metadata.num_layers)."}},
}


def level_paths(name: str, layer_schema: dict, model_schema: dict, layer_what: str, model_what: str) -> dict:
    """The layer-level (/api/{model}/NAME/{layer}) and model-level (/api/{model}/NAME) paths of a service."""
    return {
        f"/api/{{model}}/{name}/{{layer}}": api_get(
            f"{name}: one layer", api_envelope_inline(layer_schema, layer_what), ["model", "layer"], layer_what
        ),
        f"/api/{{model}}/{name}": api_get(
            f"{name}: the whole model", api_envelope_inline(model_schema, model_what), ["model"], model_what
        ),
    }


def api_envelope_inline(schema: dict, what: str) -> dict:
    """api_envelope with the payload's schema inline (a $ref when SCHEMA is one)."""
    env = api_envelope("", what)
    env["properties"]["data"] = {**schema, "description": what}
    return env


class Service:
    """Base class of a per-neuron service. Class attributes describe it; hooks do nothing unless
    overridden. Only `name` and `open_layer` are required for a service to appear on the site."""

    name: str = ""  # URL segment and store folder: [a-z][a-z0-9_]*
    title: str = ""  # heading on the neuron page
    description: str = ""  # one sentence: what a reader finds here
    index_blurb: str | None = None  # its row of the index page's "Data sources" table (default: the description)
    needs: tuple[str, ...] = ()  # store folders it renders from (any one suffices); default: its own name
    column_order: int = 100  # where its layer-table columns go (lower first; ties in registry order)
    # The service whose per-neuron JSON holds the texts and activations the page's script reads
    # (data-json) and whose layer JSON ranks the layer's neurons (the layer page links it).
    activations: bool = False
    text_search: bool = False  # its data feeds the model page's explanation (free-text) search (hook search_texts)

    # --- the store: what `Store.open` checks of this service's tables (sitegen/store/manifest.py) ----
    # Its layer table's columns and their Arrow types (a pyarrow.Schema, with `neuron` among them),
    # declared once: the compute half builds its tables against it, merge and the render half read
    # its columns, and Store.open refuses a table lacking one of them or holding one as another type
    # (one line naming the file, the column and the fix); further columns may follow them. None: only
    # a `neuron` column is checked.
    table_schema: pa.Schema | None = None
    complete_layers: bool = False  # one row per neuron in every layer (else: some neurons of some layers)
    always_stored: bool = False  # every store lists it (a manifest without it is damaged)
    store_token_columns: tuple[
        str, ...
    ] = ()  # columns of token ids (lists of ints): each must be an id of vocab.parquet

    # --- render half (no torch) -------------------------------------------------------------------

    def available(self, store) -> bool:
        """Whether the store holds data this service renders."""
        return any(store.has_service(name) for name in (self.needs or (self.name,)))

    def cli_commands(self) -> list:
        """click commands this service adds to `sitegen` (e.g. the explainer's `explain`); a name
        sitegen or another service already has is refused."""
        return []

    def prepare(self, site) -> None:
        """Load the model-wide data this service's layer views share (via `site.cached`), before
        any layer is rendered: a parallel build calls it once in the main process, so the worker
        processes inherit the data instead of each computing it again."""

    def open_layer(self, store, layer: int, site) -> LayerView:
        """Read the service's table for one layer (`site` is the build's SiteModel)."""
        raise NotImplementedError(f"service {self.name!r} defines no open_layer")

    @property
    def template(self) -> str:
        """The neuron page partial, looked up in the theme, then in `template_dir()`."""
        return f"services/{self.name}.html"

    def template_dir(self) -> Path | None:
        """The folder holding this service's partials, `services/<name>.html` and
        `provenance/<name>.html`: by default `templates/` beside the module that defines the
        service class (a service is one folder). A theme's file of the same name wins over it."""
        file = getattr(sys.modules.get(type(self).__module__), "__file__", None)
        folder = Path(file).resolve().parent / "templates" if file else None
        return folder if folder is not None and folder.is_dir() else None

    def layer_columns(self) -> list[Column]:
        """Columns this service adds to the layer table (in registry order after the neuron column)."""
        return []

    def layer_cells(self, view: LayerView, neuron: int, payload: dict) -> list[Cell]:
        """This neuron's cells for `layer_columns()`, one per column."""
        return []

    def neuron_summary(self, view: LayerView, neuron: int, payload: dict) -> list[tuple[str, Markup]]:
        """Facts for the summary line at the top of the neuron page, as (label, escaped HTML)
        pairs, in registry order after the other services' (neuroscope: max, density, top tokens;
        neuron2graph: the graph's F1; the explainer: the explanation). Empty by default."""
        return []

    def layer_facts(self, view: LayerView, neuron: int, payload: dict) -> dict:
        """Per-neuron facts for the model page's layer summary: `max`, `frac`, `top_token` (one
        service supplies them; the summary is empty without)."""
        return {}

    def model_facts(self, site, layer_payloads: list[dict]) -> dict[str, str]:
        """Lines for the model page's summary, {label: plain text} (the template escapes them),
        from every layer's payload."""
        return {}

    def model_payload(self, site, layer_payloads: list[dict]) -> dict:
        """The model-level API `data` (/api/<model>/<service>.json) from every layer's payload:
        by default the layers' `important_neurons` ranked together, else the layer count."""
        ranked = [x for lp in layer_payloads for x in lp.get("important_neurons", ())]
        if ranked:
            return {"important_neurons": sorted(ranked, key=lambda x: (-x[1], x[0]["layer"], x[0]["neuron"]))}
        return {"num_layers": site.num_layers}

    def build_notes(self, store) -> list[str]:
        """One-line warnings the build prints about this service's data in `store` (e.g. results
        that need recomputing); none by default."""
        return []

    def search_tokens(self, site) -> TokenIndex | None:
        """The model's token search postings and result previews (one service supplies them; the
        site has no token search without). site/search.py writes the files."""
        return None

    def search_texts(self, site) -> dict[int, str]:
        """Global neuron id -> a free text (an explanation) for the explanation search and the
        search results' previews (with `text_search = True`)."""
        return {}

    def search_notes(self, site) -> dict[int, str]:
        """Global neuron id -> a short line the search results' previews show after the
        explanation (the explanation's scores with their intervals); none by default."""
        return {}

    def edge_functions(self) -> list[EdgeFunction]:
        """The Netlify Edge Functions this service owns (`EdgeFunction`s; none by default): URLs a
        static file cannot answer (neuron2graph's DeepDecipher search URL). `sitegen serve` runs
        each one's Python port for its path, before the URL rules, as Netlify runs the Deno module.
        Netlify bundles only what netlify.toml declares from `netlify/edge-functions/`: the
        repository declares each one there (`[[edge_functions]]` with the same path and cache,
        before the site's own `api-not-found`) with an entry module that re-exports `source`
        (tests/test_one_folder.py checks both); serve refuses a declaration that disagrees."""
        return []

    # --- provenance: how the service's data was made (site/provenance.py gathers it) --------------

    provenance_order: int = (
        100  # where its row goes in the neuron page's Provenance section (lower first; ties in registry order)
    )

    def provenance_records(self, manifest: dict) -> dict:
        """Model-level provenance its compute half recorded in the store's manifest (e.g. its
        settings), {key: plain data}, added to metadata.provenance in every API response; no key
        sitegen's own record has (the OpenAPI writer refuses a clash declared in `provenance_schemas`)."""
        return {}

    def provenance_schemas(self) -> dict:
        """The OpenAPI schema of each key `provenance_records` adds: {key: schema}."""
        return {}

    def neuron_provenance(self, payloads: dict, layer: int, neuron: int, model_provenance: dict) -> dict | None:
        """This neuron's row of the page's Provenance section, or None for no row: the context
        (`row`) of the partial `provenance/<name>.html` (looked up like `template`; it renders one
        `<dt>`/`<dd>` pair and may call `val(v)`: a value, or "not recorded" for None), plain data
        that the partial escapes. `payloads`: every available service's API data for the neuron;
        `model_provenance`: the model-level record. Runs for every neuron page: keep it cheap."""
        return None

    @property
    def provenance_template(self) -> str:
        return f"provenance/{self.name}.html"

    def openapi_paths(self) -> dict:
        """OpenAPI path items: by default the per-neuron URL with a free-form object, and the
        layer- and model-level URLs every service has (the build writes all three)."""
        what = self.description or self.name
        return {
            f"/api/{{model}}/{self.name}/{{layer}}/{{neuron}}": api_get(
                what, api_envelope(f"#/components/schemas/{self.schema_name}", what), LAYER_NEURON
            ),
            **level_paths(
                self.name,
                {"type": "object"},
                {"type": "object"},
                f"{self.name}'s layer-level data",
                f"{self.name}'s model-level data",
            ),
        }

    def openapi_schemas(self) -> dict:
        """OpenAPI component schemas this service's paths refer to."""
        return {self.schema_name: {"type": "object", "description": self.description or self.name}}

    @property
    def schema_name(self) -> str:
        return "".join(part.capitalize() for part in self.name.split("_"))

    # --- verify: `sitegen verify` (no torch: the verifier gets numpy activations) ----------------

    def verifier(self, store, run: VerifyRun) -> Verifier | None:
        """A `Verifier` that checks this service's tables against the model rerun on the store's
        stored token ids, or None (the default: the service has nothing to verify). Called for a
        store it is `available` in, before the model loads (so a damaged table fails fast)."""
        return None

    # --- compute half (may import torch, lazily, inside the hooks) --------------------------------

    def accumulator(self, layer: int, run: CorpusRun):
        """A per-layer accumulator for `sitegen compute`'s corpus pass, or None (the default: the
        service computes nothing there). The accumulator gets `update(acts, batch)` per batch
        (acts: float32 torch tensor [batch, seq, layer_size]; batch: a `Batch`), `state()` -> dict
        of numpy arrays, nested dicts allowed (saved in checkpoints), `load(state)`, and `table()`
        -> a pyarrow table with a `neuron` column, one row per neuron, written as the service's
        layer file."""
        return None

    def in_corpus_pass(self, cfg) -> bool:
        """Whether its `accumulator` runs in the corpus pass `sitegen compute`'s arguments
        (sitegen.compute.runner.ComputeConfig) describe (default: always). A service whose pass is
        too costly to run by default answers from a corpus-pass setting of ComputeConfig (the
        correlation service: `correlations`, `--correlations`), a field the run hash holds: a service
        that sits out a run writes no table and leaves the run hash as it was."""
        return True

    def sequences_used(self, table) -> Iterable[int]:
        """The sequence ids one of its layer tables refers to: the store keeps exactly the
        sequences some service's table uses (compute and merge ask every service)."""
        return ()

    def manifest_records(self) -> dict:
        """Top-level manifest fields this service's corpus pass writes (e.g. the statistics' binning);
        no two services may write the same field."""
        return {}

    def manifest_schemas(self) -> dict:
        """The type of each field `manifest_records` writes: {field: a sitegen.store.manifest.Record
        subclass}. Store.open checks a store listing this service against them (one line naming
        the field on a mismatch), so its render half can trust what it reads there."""
        return {}

    from_weights: bool = False  # computed from the model's weights alone (hook weight_tables), not the corpus

    def weight_tables(self, model):
        """For a `from_weights` service: (layer, pyarrow table) for every layer, from the loaded
        model (sitegen.compute.models.LoadedModel) alone. `sitegen compute` runs it once, in the
        first shard (skipped by --no-weights); `sitegen merge` copies that shard's files as they are."""
        raise NotImplementedError(f"service {self.name!r} is from_weights but defines no weight_tables")

    def merge_tables(self, tables: list, run: CorpusRun):
        """`sitegen merge`: one layer's tables from every shard (in shard order) -> the merged
        table: the table one run over the whole corpus gives. Must not depend on the order (adding
        counts is the usual way). Only called for services whose shards all hold the table."""
        raise NotImplementedError(f"service {self.name!r} cannot merge shards: it defines no merge_tables")

    def compute_options(self) -> list:
        """click Options this service adds to `sitegen compute` (e.g. neuron2graph's --n2g; import
        click inside the hook). Their values reach the compute hooks as `cfg.options[<the option's
        parameter name>]`, absent from a config made in Python without them (read them with your
        default). Only the stage hooks below may act on them: the corpus pass never sees them, so
        they are no part of the run hash and a store is recognised whatever they say. Their
        defaults must ask for no stage (`ComputeConfig.without_stages()` drops them all). A name
        one of sitegen's own compute options or another service's option has is refused."""
        return []

    def check_compute_config(self, cfg) -> None:
        """Refuse `sitegen compute` arguments (sitegen.compute.runner.ComputeConfig) this service
        cannot work with, before any work: raise sitegen.errors.ConfigError, one line naming the
        option and the fix. `ComputeConfig.validate()` asks every registered service."""

    def stage_requested(self, cfg) -> bool:
        """Whether `sitegen compute`'s arguments (sitegen.compute.runner.ComputeConfig) ask for
        this service's stage: work run on the finished, whole store (also on a complete one)."""
        return False

    def run_stage(self, model, store, cfg, log) -> None:
        """The stage itself (model: the loaded model; store: the whole sitegen.store.Store). It
        writes its own tables and manifest record and must resume where an interrupted run stopped."""
        raise NotImplementedError(f"service {self.name!r} requests a stage but defines no run_stage")

    def stage_layers(self, store, cfg) -> dict[int, Any]:
        """The stage split by layer, for `sitegen compute --ray` (one task per layer): the layers
        with work left, each with the argument its task hands `run_stage_layer`; {} when done."""
        raise NotImplementedError(
            f"service {self.name!r} cannot split its stage by layer (--ray); run it without --ray"
        )

    def run_stage_layer(self, model, store, cfg, layer: int, arg, log) -> dict:
        """One layer's part of the stage. `store` is a store of its own for the task: the whole
        store's files, and this service's folder holding just this layer's table; the driver
        copies that table and the service's manifest record back. Returns figures: `made` (items
        made, e.g. graphs) and `seconds`."""
        raise NotImplementedError(
            f"service {self.name!r} cannot split its stage by layer (--ray); run it without --ray"
        )

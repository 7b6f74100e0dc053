"""Read OpenAI's published per-neuron explanation files (the GPT-2 small/XL release of "Language
models can explain neurons in language models") into the service's table.

A file holds one JSON object per line (a .jsonl) or one JSON document (.json):
    {"neuron_id": {"layer_index": L, "neuron_index": N},
     "scored_explanations": [{"explanation": "...", "scored_simulation": {"ev_correlation_score": 0.42, ...}}, ...]}
The explanation with the highest score is kept (the first on ties; an unscored one only when no
other has a score).
"""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pyarrow as pa

from sitegen.errors import ConfigError

SERVICE = "neuron_explainer"
SOURCE_PUBLISHED = "openai-published"

TABLE_SCHEMA = pa.schema(
    [
        ("neuron", pa.int32()),
        ("explanation", pa.string()),
        ("score", pa.float64()),
        ("explainer", pa.string()),
        ("source", pa.string()),
        ("method", pa.string()),
    ]
)


def _documents(path: Path):
    text = path.read_bytes()
    try:
        yield orjson.loads(text)
        return
    except orjson.JSONDecodeError:
        pass
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError:
                raise ConfigError(f"{path}:{number}: not JSON; is this one of OpenAI's explanation files?") from None


def _best(record: dict, where: str) -> tuple[str, float | None]:
    candidates = []
    for item in record.get("scored_explanations") or []:
        text = item.get("explanation")
        if not isinstance(text, str) or not text.strip():
            continue
        score = (item.get("scored_simulation") or {}).get("ev_correlation_score")
        score = float(score) if isinstance(score, (int, float)) and not math.isnan(score) else None
        candidates.append((text.strip(), score))
    if not candidates:
        raise ConfigError(
            f"{where}: no explanation in 'scored_explanations'; is this one of OpenAI's explanation files?"
        )
    scored = [c for c in candidates if c[1] is not None]
    return max(scored, key=lambda c: c[1]) if scored else candidates[0]


def read_published(folder: Path, num_layers: int, layer_size: int) -> dict[int, dict[int, tuple[str, float | None]]]:
    """layer -> neuron -> (explanation, score), from every .json/.jsonl file under folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder; pass the folder holding OpenAI's explanation files")
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file())
    if not files:
        raise ConfigError(f"{folder}: no .json or .jsonl files; pass the folder holding OpenAI's explanation files")
    out: dict[int, dict[int, tuple[str, float | None]]] = {}
    for path in files:
        for record in _documents(path):
            nid = record.get("neuron_id") if isinstance(record, dict) else None
            if (
                not isinstance(nid, dict)
                or not isinstance(nid.get("layer_index"), int)
                or not isinstance(nid.get("neuron_index"), int)
            ):
                raise ConfigError(
                    f"{path}: a record without neuron_id {{layer_index, neuron_index}}; is this one of OpenAI's explanation files?"
                )
            layer, neuron = nid["layer_index"], nid["neuron_index"]
            if not (0 <= layer < num_layers and 0 <= neuron < layer_size):
                raise ConfigError(
                    f"{path}: neuron {layer}:{neuron} does not exist in this store's model ({num_layers} layers x {layer_size}); "
                    "import the explanations into a store of the model they were written for"
                )
            out.setdefault(layer, {})[neuron] = _best(record, str(path))
    return out


def tables(found: dict[int, dict[int, tuple[str, float | None]]]) -> dict[int, pa.Table]:
    result = {}
    for layer, by_neuron in sorted(found.items()):
        neurons = sorted(by_neuron)
        result[layer] = pa.table(
            {
                "neuron": neurons,
                "explanation": [by_neuron[n][0] for n in neurons],
                "score": [by_neuron[n][1] for n in neurons],
                "explainer": ["OpenAI (published, GPT-4 explainer)"] * len(neurons),
                "source": [SOURCE_PUBLISHED] * len(neurons),
                "method": ["published"] * len(neurons),
            },
            schema=TABLE_SCHEMA,
        )
    return result


def import_explanations(folder: Path, store_root: Path, log=print) -> int:
    """Write the explanations under store_root/neuron_explainer/ (replacing earlier imports of the
    same layers) and list the service in the manifest. Returns how many neurons got one."""
    from sitegen.store import Store

    store = Store.open(store_root)
    m = store.manifest["model"]
    found = read_published(folder, int(m["num_layers"]), int(m["layer_size"]))
    for layer, table in tables(found).items():
        store.write_layer(SERVICE, layer, table)
    store.add_service(SERVICE)
    count = sum(len(v) for v in found.values())
    log(f"imported {count} explanations into {store_root} ({len(found)} layers)")
    return count

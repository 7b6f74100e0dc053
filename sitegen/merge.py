"""`sitegen merge`: combine the stores of `compute --shard I/N` runs into the store that one run
over the whole corpus gives (exactly: see services/neuroscope/stats.py for why sums are exact).

No torch: a laptop can merge what several GPU machines computed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sitegen.corpus_keys import random_key
from sitegen.errors import StoreError
from sitegen.services import registry
from sitegen.services.base import Service
from sitegen.services.neuroscope import data as neuroscope_data
from sitegen.store import SEQUENCES_SCHEMA, Store
from sitegen.store.manifest import merged_manifest



def _random_score(seed: int):
    return lambda seq_id: -np.float32(random_key(seed, int(seq_id)))


def merge_stores(parts: list[Path], out: Path) -> Path:
    stores = [Store.open(p) for p in parts]
    manifests = [s.manifest for s in stores]
    first = manifests[0]
    for path, m in zip(parts, manifests):
        if m.get("run_hash") != first.get("run_hash"):
            raise StoreError(f"{path} was computed with other arguments (model, corpus, budget or options) than {parts[0]}; merge only shards of one run")
        if not m.get("shard"):
            raise StoreError(f"{path} is a whole store, not a shard; merge takes the stores of 'compute --shard I/N' runs")
    count = first["shard"]["count"]
    indices = sorted(m["shard"]["index"] for m in manifests)
    if indices != list(range(count)):
        missing = sorted(set(range(count)) - set(indices))
        dupes = sorted({i for i in indices if indices.count(i) > 1})
        raise StoreError(f"merge needs each of the {count} shards exactly once (missing: {missing or 'none'}, repeated: {dupes or 'none'})")
    target = Store(out)
    if out.exists() and any(out.iterdir()):
        raise StoreError(f"--out {out} is not empty; merge into a new folder (nothing was changed)")
    stores = [stores[[m["shard"]["index"] for m in manifests].index(i)] for i in range(count)]
    manifests = [s.manifest for s in stores]

    cfg = first["config"]
    top_k, n_random, seq_len, seed = cfg["top_k"], cfg["n_random"], cfg["seq_len"], cfg["seed"]
    score = _random_score(seed)
    seqs = pa.concat_tables([s.sequences() for s in stores])
    lengths = dict(zip(seqs.column("seq_id").to_pylist(), pc.list_value_length(seqs.column("token_ids")).to_pylist()))
    referenced: set[int] = set()
    for layer in range(first["model"]["num_layers"]):
        states = [neuroscope_data.table_to_state(s.read_layer(neuroscope_data.SERVICE, layer), top_k, n_random, seq_len) for s in stores]
        merged = neuroscope_data.merge_states(states, top_k, n_random, score)
        table = neuroscope_data.state_to_table(merged, top_k, n_random, lengths)
        for col in ("top_seq", "bottom_seq", "random_seq"):
            referenced.update(table.column(col).combine_chunks().flatten().to_pylist())
        target.write_layer(neuroscope_data.SERVICE, layer, table)
    services = [neuroscope_data.SERVICE]
    for svc in registry():  # computed from the weights by the first shard alone
        if svc.from_weights and stores[0].has_service(svc.name):  # the files themselves: a table read back and rewritten would not keep the bytes
            for layer in range(first["model"]["num_layers"]):
                target.layer_path(svc.name, layer).parent.mkdir(parents=True, exist_ok=True)
                stores[0].read_layer(svc.name, layer)  # checksums verified: a damaged file is not passed on
                shutil.copyfile(stores[0].layer_path(svc.name, layer), target.layer_path(svc.name, layer))
            services.append(svc.name)
    for svc in registry():  # the other services computed in the corpus pass merge their own tables
        mergeable = type(svc).merge_tables is not Service.merge_tables
        if mergeable and svc.name not in services and all(st.has_service(svc.name) for st in stores):
            for layer in range(first["model"]["num_layers"]):
                target.write_layer(svc.name, layer, svc.merge_tables([st.read_layer(svc.name, layer) for st in stores]))
            services.append(svc.name)
    keep = pc.is_in(seqs.column("seq_id"), value_set=pa.array(sorted(referenced), pa.int64()))
    seqs = seqs.filter(keep)
    seqs = seqs.take(pc.sort_indices(seqs, sort_keys=[("seq_id", "ascending")]))
    # Parquet reads list items back as 'element'; the canonical schema ('item') keeps the bytes of a single run
    target.write_sequences(seqs.cast(SEQUENCES_SCHEMA))
    target.write_vocab(stores[0].vocab())  # read (checksums verified) rather than copied: a damaged file is not passed on
    target.write_manifest(merged_manifest(manifests, services))
    return out

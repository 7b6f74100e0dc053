"""`sitegen merge`: combine the stores of `compute --shard I/N` runs into the store that one run
over the whole corpus gives, exactly: each service merges its own tables (hook `merge_tables`:
counts and fixed-point sums add up, extremes are re-ranked).

    check the shards (one run, each shard once, an empty --out) -> mark --out as an unfinished
    merge (.merging, holding the command) -> merge every layer of each service the shards list (or
    copy the first shard's weight-based files) -> the sequences the merged tables use ->
    vocabulary -> manifest last -> remove the mark.

An interrupted merge leaves the mark: `build` and the other readers then name the merge command to
rerun, and that rerun clears what the interrupted one wrote and starts over (a merge only reads
the shards, so nothing is lost).

No torch: a laptop can merge what several GPU machines computed. No service is named here.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from sitegen.dictionaries.quality import add_sums, quality_figures
from sitegen.errors import DiskFull, StoreError
from sitegen.services import by_name
from sitegen.services.base import CorpusRun, Service
from sitegen.store import DICTIONARIES, LOCK, MANIFEST, MERGING, SEQUENCES_SCHEMA, Store, atomic_write_bytes
from sitegen.store.manifest import merged_manifest


def merge_stores(parts: list[Path], out: Path) -> Path:
    stores = _shards_in_order(parts, out)
    _clear_unfinished(out)
    command = shlex.join(["sitegen", "merge", *(str(p) for p in parts), "--out", str(out)])
    atomic_write_bytes(
        out / MERGING, orjson.dumps({"about": "an unfinished 'sitegen merge': rerun this command", "command": command})
    )
    try:
        _merge(stores, out)
    except KeyboardInterrupt:
        raise StoreError(
            f"merge interrupted; {out} is unfinished: rerun the same command ({command}), which starts it over"
        ) from None
    except DiskFull as e:  # nothing of a merge is kept: say what the rerun does
        raise StoreError(
            f"disk full while writing {e.path}; free space and rerun the same command ({command}), which starts {out} over"
        ) from None
    (out / MERGING).unlink()
    return out


def _merge(stores: list[Store], out: Path) -> None:
    """Merge the shards' stores into `out`: the neurons' store, and each dictionary's store (compute
    --sae) under out/dictionaries/<name>/ before the neurons' manifest, which is written last."""
    for name in stores[0].manifest.get("dictionaries", []):
        parts = [Store.open(s.dictionary_root(name)) for s in stores]
        for part in parts[1:]:
            if part.manifest.get("run_hash") != parts[0].manifest.get("run_hash"):
                raise StoreError(
                    f"{part.root} was computed with other arguments than {parts[0].root}; merge only shards of one run"
                )
        _merge_units(parts, Store(out).dictionary_root(name))
    _merge_units(stores, out)


def _merge_units(stores: list[Store], out: Path) -> None:
    manifests = [s.manifest for s in stores]
    first = manifests[0]
    seqs = pa.concat_tables([s.sequences() for s in stores])
    cfg = first["config"]
    run = CorpusRun(
        layer_size=first["model"]["layer_size"],
        seq_len=cfg["seq_len"],
        first_valid=cfg["first_valid_position"],
        top_k=cfg["top_k"],
        n_random=cfg["n_random"],
        seed=cfg["seed"],
        seq_lengths=dict(
            zip(seqs.column("seq_id").to_pylist(), pc.list_value_length(seqs.column("token_ids")).to_pylist())
        ),
    )
    target = Store(out)
    referenced: set[int] = set()
    services = []
    registered = by_name()
    for name in first["services"]:  # in the shards' order; a service no longer registered is left out
        svc = registered.get(name)
        if svc is not None and _merge_service(svc, stores, target, run, first["model"]["num_layers"], referenced):
            services.append(name)
    target.write_sequences(_used_sequences(seqs, referenced))
    target.write_vocab(
        stores[0].vocab()
    )  # read (checksums verified) rather than copied: a damaged file is not passed on
    merged = merged_manifest(manifests, services)
    if first.get("dictionary") is not None:  # a dictionary's store: its quality sums add up, its figures follow
        sums = add_sums([m["dictionary"]["sums"] for m in manifests])
        merged["dictionary"] = {**first["dictionary"], "sums": sums, "quality": quality_figures(sums)}
    target.write_manifest(merged)


def _shards_in_order(parts: list[Path], out: Path) -> list[Store]:
    """The shards of one run, each exactly once, in shard order; refuses a non-empty --out."""
    stores = [Store.open(p) for p in parts]
    manifests = [s.manifest for s in stores]
    first = manifests[0]
    for path, m in zip(parts, manifests):
        if m.get("run_hash") != first.get("run_hash"):
            raise StoreError(
                f"{path} was computed with other arguments (model, corpus, budget or options) than {parts[0]}; merge only shards of one run"
            )
        if not m.get("shard"):
            raise StoreError(
                f"{path} is a whole store, not a shard; merge takes the stores of 'compute --shard I/N' runs"
            )
        # The run hash holds the checkpoint's fingerprint, which for a hub model is its name: two
        # machines can load other revisions under one name. The weights' own hash tells them apart.
        mine, theirs = m["model"].get("weights_sha256"), first["model"].get("weights_sha256")
        if mine != theirs:
            raise StoreError(
                f"{path} was computed with other model weights (weights_sha256 {mine}) than {parts[0]} ({theirs}); "
                "recompute the shards with one checkpoint (a local folder, or a hub model at one revision)"
            )
    count = first["shard"]["count"]
    indices = sorted(m["shard"]["index"] for m in manifests)
    if indices != list(range(count)):
        missing = sorted(set(range(count)) - set(indices))
        dupes = sorted({i for i in indices if indices.count(i) > 1})
        raise StoreError(
            f"merge needs each of the {count} shards exactly once (missing: {missing or 'none'}, repeated: {dupes or 'none'})"
        )
    if out.exists() and any(out.iterdir()) and not _unfinished(out):
        raise StoreError(f"--out {out} is not empty; merge into a new folder (nothing was changed)")
    return [stores[[m["shard"]["index"] for m in manifests].index(i)] for i in range(count)]


def _unfinished(out: Path) -> bool:
    """--out holds an interrupted merge and nothing else: its mark, no manifest, only what merge writes."""
    if not (out / MERGING).is_file() or (out / MANIFEST).exists():
        return False
    services = set(by_name())
    return all(
        p.name in (MERGING, LOCK, "vocab.parquet", "sequences.parquet")
        or (p.name.startswith(".") and p.name.endswith(".tmp"))
        or ((p.name in services or p.name == DICTIONARIES) and p.is_dir() and not p.is_symlink())
        for p in out.iterdir()
    )


def _clear_unfinished(out: Path) -> None:
    """Delete what an interrupted merge into `out` wrote (checked by _unfinished), so a rerun starts over."""
    if not out.exists() or not any(out.iterdir()):
        return
    for p in out.iterdir():
        if p.name == LOCK:
            continue  # the lock file stays (see Store._manifest_lock)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _merge_service(
    svc: Service, stores: list[Store], target: Store, run: CorpusRun, n_layers: int, referenced: set[int]
) -> bool:
    """One service's layers into `target`; whether the merged store has it."""
    if svc.from_weights:  # computed from the weights by the first shard alone: its files themselves
        if not stores[0].has_service(svc.name):
            return False
        for layer in range(n_layers):  # a table read back and rewritten would not keep the bytes
            if not stores[0].layer_path(svc.name, layer).exists():  # a service with tables at some layers only
                continue
            target.layer_path(svc.name, layer).parent.mkdir(parents=True, exist_ok=True)
            table = stores[0].read_layer(svc.name, layer)  # checksums verified: a damaged file is not passed on
            referenced.update(svc.sequences_used(table))
            shutil.copyfile(stores[0].layer_path(svc.name, layer), target.layer_path(svc.name, layer))
        return True
    mergeable = type(svc).merge_tables is not Service.merge_tables
    if not mergeable or not all(st.has_service(svc.name) for st in stores):
        return False
    for layer in range(n_layers):
        # allow_inf: a shard's neurons that saw no token keep min = +inf, max = -inf (the merge's identity)
        table = svc.merge_tables([st.read_layer(svc.name, layer, allow_inf=True) for st in stores], run)
        referenced.update(svc.sequences_used(table))
        target.write_layer(svc.name, layer, table)
    return True


def _used_sequences(seqs: pa.Table, referenced: set[int]) -> pa.Table:
    """The sequences the merged tables use, by id; in the canonical schema, since Parquet reads list
    items back as 'element' and 'item' keeps the bytes of a single run."""
    keep = pc.is_in(seqs.column("seq_id"), value_set=pa.array(sorted(referenced), pa.int64()))
    seqs = seqs.filter(keep)
    seqs = seqs.take(pc.sort_indices(seqs, sort_keys=[("seq_id", "ascending")]))
    return seqs.cast(SEQUENCES_SCHEMA)

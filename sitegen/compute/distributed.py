"""`sitegen compute --ray [ADDRESS]`: the same run as `sitegen compute`, spread over a Ray cluster.

    driver (this process)                      Ray workers (one task per GPU, or per CPU group)
    ---------------------                      ------------------------------------------------
    plan: N shards, OUT/.work/ray/plan.json    shard task I: run_compute(--shard I/N) into
    submit N shard tasks                  ->     OUT/.work/ray/shard-IofN (checkpoints in its .work)
    progress + ETA per shard and overall  <-     progress reports (a Ray actor)
    merge_stores(shards) -> OUT, manifest last
    a service's stage: one task per layer ->   layer task L: the service's run_stage_layer on a
    fold each layer's table into OUT      <-     per-layer store OUT/.work/stages/<service>/layer=L
                                                 (own manifest: no races)

Why this is exact: a shard's store is what `compute --shard I/N` writes, and merge_stores turns the
shards into the store one whole run gives (tests/test_compute.py and tests/test_ray.py check it).

Every node must see OUT at the same path (a shared folder: NFS, a cluster filesystem, or one machine);
each task checks this first and fails with one line if not. Relative paths (--out, --model,
--corpus) are read from the driver's working directory, which must also exist on every node; tasks
run there, so the manifest records exactly what a single run started there records.

Fault tolerance: Ray retries a task whose worker died (max_retries); run_compute then resumes from
that shard's last checkpoint. A rerun of the whole command reuses the recorded shard count, skips
finished shards and resumes the others. Only the driver writes OUT's own files.

Generic per-layer work (the services' stages) goes through map_layers():
a function of (layer, payload) run as one task per layer with the cluster's per-task resources,
its results handed back to the driver, which alone writes the merged store.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson

from sitegen import store as store_mod
from sitegen.compute.runner import ComputeConfig
from sitegen.errors import ConfigError, MissingDependency, SitegenError, StoreError

INSTALL_HINT = "--ray needs Ray, which is not installed: pip install 'sitegen[ray]'"
RAY_DIR = "ray"  # under OUT/.work
STAGES_DIR = "stages"  # under OUT/.work
DEFAULT_CPUS_PER_SHARD = 4


@dataclass
class RayOptions:
    # None: start a local cluster; 'auto': the one `ray start` runs here; HOST:PORT or ray://HOST:PORT.
    # A caller that has already run ray.init() keeps its cluster (the address is then not used).
    address: str | None = None
    shards: int | None = None  # None: one per GPU of the cluster, else one per CPU group
    cpus_per_shard: int | None = None  # CPU group size when there is no GPU [default: min(4, CPUs of the largest node)]
    num_cpus: int | None = None  # size of a local cluster (None: every core)
    max_retries: int = 3  # retries of a task whose worker died
    report_seconds: float = 10.0  # how often the progress line is printed


def import_ray():
    try:
        import ray
    except ImportError:
        raise MissingDependency(INSTALL_HINT) from None
    return ray


# ---------------------------------------------------------------- driver


def run_compute_ray(
    cfg: ComputeConfig,
    opts: RayOptions,
    log: Callable[[str], None] = print,
    *,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> Path:
    """`on_checkpoint(path)`: run_compute's seam, handed to every shard task (so it must pickle);
    called in the worker after each of its shard's checkpoints."""
    cfg.validate()
    if cfg.shard != (0, 1):
        raise ConfigError(
            f"--shard {cfg.shard[0]}/{cfg.shard[1]} with --ray: Ray splits the run itself; leave out --shard (use --ray-shards N to choose the count)"
        )
    if opts.shards is not None and opts.shards < 1:
        raise ConfigError(f"--ray-shards {opts.shards}: must be at least 1")
    if opts.cpus_per_shard is not None and opts.cpus_per_shard < 1:
        raise ConfigError(f"--ray-cpus-per-shard {opts.cpus_per_shard}: must be at least 1")
    ray = import_ray()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise StoreError(f"--out {out} is a file; choose a new or empty folder")
    with _ray_session(ray, opts):
        slot = task_slot(ray, cfg, opts)
        if not (out / store_mod.MANIFEST).exists():
            _shard_phase(ray, cfg, opts, slot, log, on_checkpoint)
        elif not _check_existing(ray, cfg, slot, log):
            return out
        stages = _stages(cfg)
        if stages:
            with _driver_lock(out):
                for svc in stages:  # on the neurons, then on each dictionary's latents (compute --sae)
                    _stage_phase(ray, cfg, svc, opts, slot, log)
                    for index, name in enumerate(store_mod.Store.open(out).manifest.get("dictionaries", [])):
                        _stage_phase(ray, cfg, svc, opts, slot, log, dictionary=(index, name))
            shutil.rmtree(out / store_mod.WORK_DIR, ignore_errors=True)
    return out


@contextmanager
def _ray_session(ray, opts: RayOptions) -> Iterator[None]:
    import logging

    started = not ray.is_initialized()
    if started and opts.address not in (None, "auto", "local"):
        _check_reachable(opts.address)
    if started:
        try:
            if opts.address is None:  # a new local cluster, even when another one runs here
                ray.init(
                    address="local",
                    num_cpus=opts.num_cpus,
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                )
            else:
                ray.init(address=opts.address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            where = opts.address or "a local cluster"
            raise ConfigError(
                f"--ray {where}: cannot connect ({' '.join(str(e).split())[:200]}); start it with 'ray start --head' "
                "or pass the head's address, e.g. --ray 10.0.0.1:6379"
            ) from None
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _check_reachable(address: str) -> None:
    """Ray waits minutes on an address nobody answers at; a plain connect says so in seconds."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except ValueError:
        raise ConfigError(
            f"--ray {address}: use HOST:PORT (e.g. --ray 10.0.0.1:6379), ray://HOST:PORT, auto, or nothing for a local cluster"
        ) from None
    except OSError as e:
        raise ConfigError(
            f"--ray {address}: nothing answers there ({e.strerror or e}); start the head with 'ray start --head' "
            "and pass the address it prints"
        ) from None


@dataclass
class TaskSlot:
    """What one task asks of the cluster."""

    num_cpus: int
    num_gpus: int
    shards: int  # the default shard count (one per slot)


def task_slot(ray, cfg: ComputeConfig, opts: RayOptions) -> TaskSlot:
    """One GPU per task when the cluster has GPUs (and --device allows), else a group of CPUs."""
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    if gpus and cfg.device in ("auto", "cuda"):
        return TaskSlot(1, 1, gpus)
    if cfg.device == "cuda":
        raise ConfigError("--device cuda with --ray: the cluster has no GPU; use --device cpu or auto")
    node_cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    largest = max(node_cpus, default=1) or 1
    per = opts.cpus_per_shard or min(DEFAULT_CPUS_PER_SHARD, largest)
    if per > largest:
        raise ConfigError(f"--ray-cpus-per-shard {per}: the largest Ray node has {largest} CPUs; use at most {largest}")
    return TaskSlot(per, 0, max(1, sum(c // per for c in node_cpus)))


def _check_existing(ray, cfg: ComputeConfig, slot: TaskSlot, log) -> bool:
    """OUT is a complete store: let run_compute (on a worker, where the model may live) say whether it
    was computed with these arguments. True when there is more to do (a stage)."""
    ref = _remote(ray, _check_task, slot, 0).remote(cfg.without_stages(progress=False), os.getcwd())
    for message in _get(ray, ref, "checking the existing store"):
        log(message)
    return bool(_stages(cfg))


def _stages(cfg: ComputeConfig) -> list:
    """The services whose stage the arguments ask for (hook stage_requested)."""
    from sitegen.services import registry

    return [s for s in registry() if s.stage_requested(cfg)]


@contextmanager
def _driver_lock(out: Path) -> Iterator[None]:
    from sitegen.compute.runner import _lock

    with _lock(out / store_mod.WORK_DIR):
        yield


def _shard_phase(ray, cfg: ComputeConfig, opts: RayOptions, slot: TaskSlot, log, on_checkpoint) -> None:
    out = Path(cfg.out)
    work = out / store_mod.WORK_DIR
    if out.exists() and any(p.name != store_mod.WORK_DIR for p in out.iterdir()) and not work.exists():
        raise StoreError(f"--out {out} is a non-empty folder that is not a sitegen store; choose a new or empty folder")
    with _driver_lock(out):
        plan = _plan(work / RAY_DIR, opts.shards or slot.shards, opts.shards is not None)
        count = plan["shards"]
        roots = [work / RAY_DIR / f"shard-{i}of{count}" for i in range(count)]
        log(
            f"ray: {count} shard task(s), each {slot.num_gpus} GPU"
            if slot.num_gpus
            else f"ray: {count} shard task(s), each {slot.num_cpus} CPU(s)"
        )
        progress = ray.remote(num_cpus=0)(_ProgressBoard).remote()
        refs = {}
        for i, root in enumerate(roots):
            task = _remote(ray, _shard_task, slot, opts.max_retries)
            refs[
                task.remote(
                    cfg,
                    i,
                    count,
                    str(root),
                    str(work / RAY_DIR / "plan.json"),
                    plan["token"],
                    os.getcwd(),
                    slot.num_cpus if not slot.num_gpus else None,
                    progress,
                    on_checkpoint,
                )
            ] = i
        started = time.monotonic()
        results = _await_all(
            ray, refs, "shard", log, opts.report_seconds, lambda _done: _progress_line(ray, progress, count, started)
        )
        board = ray.get(progress.snapshot.remote())
        compute_s = time.monotonic() - started
        log(f"ray: merging {count} shard stores into {out}")
        t0 = time.monotonic()
        _merge_into(roots, out)
        merge_s = time.monotonic() - t0
        for line in _summary(results, board, compute_s, merge_s):
            log(line)
    shutil.rmtree(work, ignore_errors=True)


def _plan(folder: Path, shards: int, explicit: bool) -> dict:
    """The shard count is fixed by the first attempt (its checkpoints depend on it); the token lets each
    task check that it sees the same folder as the driver."""
    path = folder / "plan.json"
    if path.exists():
        plan = orjson.loads(path.read_bytes())
        if explicit and plan["shards"] != shards:
            raise ConfigError(
                f"--ray-shards {shards}: {folder.parent.parent} holds an unfinished run of {plan['shards']} shards; "
                f"rerun with --ray-shards {plan['shards']} (or leave it out), or delete {folder.parent} to start over"
            )
        return plan
    plan = {"shards": shards, "token": secrets.token_hex(8)}
    store_mod.atomic_write_bytes(path, orjson.dumps(plan))
    return plan


def _merge_into(roots: list[Path], out: Path) -> None:
    """The shard stores -> OUT. merge_stores wants an empty target, so it writes under OUT/.work and
    the result moves into OUT, manifest last (its presence marks the store complete)."""
    from sitegen.merge import merge_stores

    if len(roots) == 1:  # one shard is a whole store already
        merged = roots[0]
    else:
        merged = roots[0].parent / "merged"
        shutil.rmtree(merged, ignore_errors=True)  # an interrupted earlier merge
        merge_stores(roots, merged)
    for entry in sorted(merged.iterdir()):
        if entry.name in (store_mod.MANIFEST, store_mod.WORK_DIR):
            continue
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    os.replace(merged / store_mod.MANIFEST, out / store_mod.MANIFEST)


def _stage_phase(
    ray, cfg: ComputeConfig, svc, opts: RayOptions, slot: TaskSlot, log, dictionary: tuple[int, str] | None = None
) -> None:
    """One service's stage as one task per layer with work left (hooks stage_layers, run_stage_layer),
    on the neurons' store or, with `dictionary` (its index in cfg.dictionaries, its name), on that
    dictionary's store of latents."""
    out = Path(cfg.out)
    store = store_mod.Store.open(out)
    folder = out / store_mod.WORK_DIR / STAGES_DIR / svc.name
    if dictionary is not None:
        store = store_mod.Store.open(store.dictionary_root(dictionary[1]))
        folder = folder / store_mod.DICTIONARIES / dictionary[1]
    todo = svc.stage_layers(store, cfg)
    if not todo:
        log(f"{svc.name}: nothing left to do in {store.root}")
        return
    shutil.rmtree(folder, ignore_errors=True)  # a crashed driver's leftovers: at most one layer per task is redone
    roots = {layer: _layer_store(store, folder, layer, svc.name) for layer in todo}
    log(f"{svc.name} on ray: {len(todo)} layer task(s)")

    def fold(layer: int, result: dict) -> None:  # the driver alone writes OUT: no two writers of its manifest
        part = store_mod.Store.open(roots[layer])
        data = part.layer_path(svc.name, layer).read_bytes()
        store_mod.atomic_write_bytes(store.layer_path(svc.name, layer), data)
        store.add_service(svc.name, part.manifest.get(svc.name))
        shutil.rmtree(roots[layer], ignore_errors=True)
        for message in result["messages"]:
            log(message)

    started = time.monotonic()
    payloads = {layer: (cfg, svc.name, str(roots[layer]), arg, dictionary) for layer, arg in todo.items()}
    results = map_layers(ray, _stage_layer, payloads, slot, opts, log, on_done=fold)
    made = sum(r["made"] for r in results.values())
    seconds = time.monotonic() - started
    log(
        f"{svc.name} on ray: {made} made in {len(results)} layer tasks, {seconds:.1f} s wall "
        f"({sum(r['seconds'] for r in results.values()):.1f} s of work in the tasks)"
    )


def _layer_store(store, folder: Path, layer: int, service: str) -> Path:
    """A store for one layer task: its own manifest (so tasks never share one), links to the shared
    read-only files, and a copy of the layer's existing table (kept, as a single run keeps it)."""
    root = folder / f"layer={layer}"
    root.mkdir(parents=True)
    shutil.copyfile(store.root / store_mod.MANIFEST, root / store_mod.MANIFEST)
    # The other services' folders whole (opening a store checks every table its manifest lists).
    shared = ["vocab.parquet", "sequences.parquet", *(s for s in store.manifest.get("services", []) if s != service)]
    for name in shared:
        os.symlink(os.path.abspath(store.root / name), root / name)
    old = store.layer_path(service, layer)
    if old.exists():
        (root / service / f"layer={layer}").mkdir(parents=True)
        shutil.copyfile(old, root / service / f"layer={layer}" / "data.parquet")
    return root


def map_layers(
    ray,
    fn: Callable[[int, Any], dict],
    payloads: dict[int, Any],
    slot: TaskSlot,
    opts: RayOptions,
    log: Callable[[str], None],
    on_done: Callable[[int, dict], None] | None = None,
) -> dict[int, dict]:
    """Run fn(layer, payload) -> dict as one Ray task per layer (a GPU each, or a CPU group), retried
    when a worker dies; on_done(layer, result) runs on the driver as each finishes, in finishing order.
    fn must be a module-level function (workers import it) and write only under its own folder."""
    task = _remote(ray, _layer_task, slot, opts.max_retries)
    refs = {task.remote(fn, layer, payload, os.getcwd()): layer for layer, payload in sorted(payloads.items())}
    started = time.monotonic()

    def line(done: int) -> str:
        return f"ray: {done}/{len(refs)} layer tasks done, {time.monotonic() - started:.0f} s"

    return _await_all(ray, refs, "layer", log, opts.report_seconds, line, on_done)


def _remote(ray, fn, slot: TaskSlot, max_retries: int):
    # max_calls=1: a fresh worker process per task. A task is long (a model load, then a shard or a
    # layer), so the start-up is cheap next to it, and no task inherits a process that a cancelled
    # task (a KeyboardInterrupt at any point) or a swapped runner hook may have left in a bad state.
    return ray.remote(max_calls=1)(fn).options(
        num_cpus=slot.num_cpus, num_gpus=slot.num_gpus, max_retries=max_retries, retry_exceptions=False
    )


def _await_all(
    ray,
    refs: dict,
    what: str,
    log,
    report_seconds: float,
    line: Callable[[int], str],
    on_done: Callable[[int, dict], None] | None = None,
) -> dict[int, dict]:
    """Wait for every task, printing line(tasks done) every report_seconds. On a failure or Ctrl-C
    the other tasks are cancelled gently (a KeyboardInterrupt in the task: run_compute saves a
    checkpoint) and given a little time to do so before the error is raised."""
    pending = list(refs)
    results: dict[int, dict] = {}
    last = time.monotonic()
    try:
        while pending:
            ready, pending = ray.wait(
                pending, num_returns=1, timeout=max(0.1, report_seconds - (time.monotonic() - last))
            )
            for ref in ready:
                key = refs[ref]
                results[key] = _get(ray, ref, f"{what} {key}")
                log(f"ray: {what} {key} done ({len(results)}/{len(refs)})")
                if on_done is not None:
                    on_done(key, results[key])
            if time.monotonic() - last >= report_seconds and pending:
                log(line(len(results)))
                last = time.monotonic()
    except (Exception, KeyboardInterrupt) as e:
        for ref in pending:
            ray.cancel(ref)
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=30)
        if isinstance(e, KeyboardInterrupt):
            raise StoreError(
                f"interrupted with {len(refs) - len(results)} {what} task(s) unfinished; rerun the same command to resume "
                "(finished ones are kept, the others go on from their last checkpoint)"
            ) from None
        raise
    return results


def _get(ray, ref, what: str):
    from ray import exceptions as rex

    try:
        return ray.get(ref)
    except rex.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, SitegenError):
            raise cause from None
        raise StoreError(
            f"ray: {what} failed: {' '.join(str(cause or e).split())[:300]}; rerun the same command to resume"
        ) from None
    except (rex.WorkerCrashedError, rex.NodeDiedError, rex.TaskUnschedulableError, rex.ObjectLostError) as e:
        raise StoreError(
            f"ray: {what} failed after its retries ({type(e).__name__}); rerun the same command to resume "
            "from its last checkpoint"
        ) from None


def _progress_line(ray, progress, count: int, started: float) -> str:
    board = ray.get(progress.snapshot.remote())
    done = sum(s.get("done", 0) for s in board.values())
    total = sum(s.get("total", 0) for s in board.values())
    rate = sum(s["rate"] for s in board.values() if s.get("rate") and s.get("done", 0) < s.get("total", 0))
    parts = []
    for i in range(count):
        s = board.get(i)
        if not s or not s.get("total"):
            parts.append(f"{i}: waiting" if not s else f"{i}: loading")
            continue
        pct = 100 * s["done"] / s["total"]
        eta = _eta(s["total"] - s["done"], s.get("rate"))
        tries = f", attempt {s['attempts']}" if s["attempts"] > 1 else ""
        parts.append(f"{i}: {pct:.0f}% {s.get('rate') or 0:.0f} tok/s ETA {eta}{tries}")
    known = len([s for s in board.values() if s.get("total")])
    overall = f"{done}/{total} tok" if known == count else f"{done} tok ({count - known} shard(s) not started)"
    return (
        f"ray: {overall}, {rate:.0f} tok/s, ETA {_eta(total - done, rate) if known == count else '?'}, "
        f"{time.monotonic() - started:.0f} s | " + "; ".join(parts)
    )


def _eta(remaining: float, rate: float | None) -> str:
    if remaining <= 0:
        return "0 s"
    if not rate:
        return "?"
    s = remaining / rate
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _summary(results: dict[int, dict], board: dict, compute_s: float, merge_s: float) -> list[str]:
    tokens = sum(r["tokens"] for r in results.values())
    lines = [
        f"ray summary: {len(results)} shards, {tokens} tokens in {compute_s:.1f} s ({tokens / max(compute_s, 1e-9):.0f} tok/s overall), "
        f"merge {merge_s:.1f} s"
    ]
    for i in sorted(results):
        r, b = results[i], board.get(i, {})
        resumed = f", resumed at {r['resumed_tokens']} tokens" if r["resumed_tokens"] else ""
        lines.append(
            f"  shard {i}: {r['tokens']} tokens, {r['seconds']:.1f} s in its last attempt "
            f"({(r['tokens'] - r['resumed_tokens']) / max(r['seconds'], 1e-9):.0f} tok/s) on {r['host']}, "
            f"{b.get('attempts', 1)} attempt(s){resumed}"
        )
    return lines


class _ProgressBoard:
    """A Ray actor: tasks report (tokens done, total); the driver reads a snapshot with rates."""

    def __init__(self):
        self.shards: dict[int, dict] = {}

    def start(self, shard: int) -> None:
        s = self.shards.setdefault(shard, {"attempts": 0})
        s["attempts"] += 1
        s.pop("since", None)

    def report(self, shard: int, done: int, total: int, now: float) -> None:
        """now: the task's clock when it sent the report (reports can arrive in bursts)."""
        s = self.shards.setdefault(shard, {"attempts": 1})
        if (
            "since" not in s
        ):  # this attempt's first report: the rate counts from here (a resumed attempt starts above 0)
            s["since"], s["since_done"] = now, done
        s["done"], s["total"] = done, total
        elapsed = now - s["since"]
        s["rate"] = (done - s["since_done"]) / elapsed if elapsed > 0 else None

    def snapshot(self) -> dict:
        return self.shards


# ---------------------------------------------------------------- tasks (run on Ray workers)


def _enter(cwd: str) -> None:
    if os.path.isdir(cwd):
        os.chdir(cwd)


def _check_shared(plan_path: str, token: str) -> None:
    try:
        seen = orjson.loads(Path(plan_path).read_bytes()).get("token")
    except (OSError, orjson.JSONDecodeError):
        seen = None
    if seen != token:
        raise StoreError(
            f"ray node {socket.gethostname()} cannot see {plan_path}: --out must be a folder every Ray node sees at "
            "the same path (a shared filesystem such as NFS); see docs/guide.md, 'Compute on a Ray cluster'"
        )


def _check_task(cfg: ComputeConfig, cwd: str) -> list[str]:
    from sitegen.compute.runner import run_compute

    _enter(cwd)
    messages: list[str] = []
    run_compute(cfg, log=messages.append)
    return messages


def _shard_task(
    cfg: ComputeConfig,
    index: int,
    count: int,
    root: str,
    plan_path: str,
    token: str,
    cwd: str,
    threads: int | None,
    progress,
    on_checkpoint,
) -> dict:
    import ray

    from sitegen.compute.runner import run_compute

    _enter(cwd)
    _check_shared(plan_path, token)
    if threads:
        import torch

        torch.set_num_threads(threads)
    ray.get(progress.start.remote(index))  # waited for: a worker that dies soon after must still count as an attempt
    messages: list[str] = []
    shard_cfg = cfg.without_stages(out=Path(root), shard=(index, count), progress=True)
    start = time.monotonic()
    resumed: list = [None]
    run_compute(
        shard_cfg, log=messages.append, progress=_reporter(progress, index, resumed), on_checkpoint=on_checkpoint
    )
    manifest = store_mod.Store.open(root).manifest
    return {
        "index": index,
        "tokens": manifest["processed"]["tokens"],
        "seconds": time.monotonic() - start,
        "resumed_tokens": resumed[0] or 0,
        "host": socket.gethostname(),
        "messages": messages,
    }


def _reporter(progress, index: int, resumed: list):
    """run_compute's `progress` seam in a task: a bar that reports to the driver's progress board
    (at most once a second); `resumed[0]` gets the tokens the shard had done when it (re)started."""

    class Reporter:
        def __init__(self, total: int, initial: int):
            self.done, self.total, self.last = initial, total, 0.0
            resumed[0] = initial
            progress.report.remote(index, self.done, self.total, time.time())

        def update(self, n: int) -> None:
            self.done += n
            if time.monotonic() - self.last >= 1.0:
                self.last = time.monotonic()
                progress.report.remote(index, self.done, self.total, time.time())

        def close(self) -> None:
            progress.report.remote(index, self.done, self.total, time.time())

    return Reporter


def _layer_task(fn: Callable[[int, Any], dict], layer: int, payload: Any, cwd: str) -> dict:
    _enter(cwd)
    return fn(layer, payload)


def _stage_layer(layer: int, payload: tuple) -> dict:
    """One layer of a service's stage into that layer's own store (OUT/.work/stages/<service>/layer=L)."""
    from sitegen.compute.models import load_model, resolve_device
    from sitegen.services import by_name

    cfg, name, root, arg, dictionary = payload
    device = resolve_device(cfg.device)
    model = load_model(cfg.model, device=device, name=cfg.name)
    if dictionary is not None:  # the latents of cfg.dictionaries[index], read through the model
        from sitegen.compute.runner import _load_dictionaries

        model = _load_dictionaries(cfg, model, device)[dictionary[0]]
    messages: list[str] = []
    figures = by_name()[name].run_stage_layer(model, store_mod.Store.open(root), cfg, layer, arg, messages.append)
    return {**figures, "messages": messages}

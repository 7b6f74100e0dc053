"""Damaged stores and checkpoints (issue 10, item 8): every store file in turn is truncated,
emptied, byte-flipped, deleted, and the manifest's fields are edited; `build`, `merge`,
`explain --dry-run` and a resumed `compute` must then answer one line on stderr starting with
"error:" and exit non-zero, never a traceback. A flipped byte that no reader depends on may
also be harmless, but then the output must be exactly the undamaged one (never silently wrong).

In-process through click's CliRunner (no subprocess per case) on small synthetic stores, so the
whole file runs in well under a minute."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import orjson
import pytest
from click.testing import CliRunner

from sitegen.cli import main
from sitegen.store import Store
from tests.conftest import HAS_TORCH
from tests.reference import write_synthetic_store


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _assert_one_line_error(res, *needles: str) -> str:
    """The CLI's answer to damage: exit code non-zero, no exception escaped, stderr = one 'error:' line."""
    assert res.exception is None or isinstance(res.exception, SystemExit), (
        f"{type(res.exception).__name__}: {res.exception}"
    )
    assert res.exit_code != 0, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _store_tables(root: Path) -> dict:
    st = Store.open(root)
    out = {
        "manifest": {k: v for k, v in st.manifest.items() if k != "sitegen_version"},
        "vocab": st.vocab(),
        "sequences": st.sequences(),
    }
    for service in st.manifest["services"]:
        for layer in range(st.manifest["model"]["num_layers"]):
            if st.layer_path(service, layer).exists():
                out[f"{service}/{layer}"] = st.read_layer(service, layer)
    return out


# -- damage -------------------------------------------------------------------------------


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _delete(p: Path) -> None:
    p.unlink()


def _flip_at(fraction: float):
    def flip(p: Path) -> None:
        data = bytearray(p.read_bytes())
        at = min(max(int(len(data) * fraction), 4), len(data) - 12)  # inside the file, past the magic, before the tail
        for i in range(at, min(at + 4, len(data))):
            data[i] ^= 0xFF
        p.write_bytes(bytes(data))

    flip.__name__ = f"flip@{fraction}"
    return flip


FILE_DAMAGE = [_truncate, _empty, _delete, *(_flip_at(f) for f in (0.0, 0.25, 0.5, 0.75, 1.0))]


def _set(path: str, value):
    def edit(m: dict) -> None:
        *parents, last = path.split(".")
        d = m
        for key in parents:
            d = d[key]
        if value is _DELETE:
            del d[last]
        else:
            d[last] = value

    edit.__name__ = f"{path}={value!r}"
    return edit


_DELETE = object()
# (edit, the field the message must name)
MANIFEST_EDITS = [
    (_set("model.layer_size", 3), "model.layer_size"),  # would drop a neuron per layer silently
    (_set("model.layer_size", 5), "model.layer_size"),  # used to raise IndexError
    (_set("model.num_layers", 1), "model.num_layers"),  # would drop a layer silently
    (_set("model.num_layers", 3), "model.num_layers"),
    (_set("model.num_layers", "2"), "model.num_layers"),
    (_set("model.num_layers", True), "model.num_layers"),
    (_set("model.num_layers", _DELETE), "model.num_layers"),
    (_set("model.name", "toy\n"), "model.name"),
    (_set("model.name", "<script>alert(1)</script>"), "model.name"),
    (_set("model.vocab_size", 7), "model.vocab_size"),
    (_set("model", []), "model"),
    (_set("config.first_valid_position", 7), "config.first_valid_position"),
    (_set("config.top_k", "3"), "config.top_k"),
    (_set("config", _DELETE), "config"),
    (_set("stats.quantile_levels", []), "stats.quantile_levels"),
    (_set("stats.quantile_levels", [0.5, 0.1]), "stats.quantile_levels"),
    (_set("stats.display_bins", "100"), "stats.display_bins"),
    (_set("stats", _DELETE), "stats"),
    (_set("processed.tokens", -1), "processed.tokens"),
    (_set("corpus", _DELETE), "corpus"),
    (_set("services", ["neuroscope", "../../elsewhere"]), "services"),
    (_set("services", ["logits"]), "services"),
    (_set("shard", {"index": 3, "count": 2}), "shard"),
    (_set("run_hash", None), "run_hash"),
]


# -- the stores ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A whole store (build, explain) and the two shards of one run (merge), with the clean outputs
    each command gives, to compare a harmless damage against."""
    root = tmp_path_factory.mktemp("damage")
    whole = write_synthetic_store(root / "whole").root
    shards = []
    for i in range(2):
        st = write_synthetic_store(root / f"shard{i}", seed=i, with_graphs=False)
        Store(st.root).write_manifest({**st.manifest, "shard": {"index": i, "count": 2}})
        shards.append(st.root)
    res = _invoke("build", whole, "--out", root / "clean-site")
    assert res.exit_code == 0, res.output
    res = _invoke("merge", *shards, "--out", root / "clean-merged")
    assert res.exit_code == 0, res.output
    res = _invoke(
        "explain", whole, "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--neurons", "1", "--dry-run"
    )
    assert res.exit_code == 0, res.output
    return {
        "root": root,
        "whole": whole,
        "shards": shards,
        "site": _tree(root / "clean-site"),
        "merged": _store_tables(root / "clean-merged"),
        "explain": res.stdout,
    }


def _files(store: Path) -> list[str]:
    """The store's data files (not the manifest's lock file, which holds no data)."""
    from sitegen.store import LOCK

    return sorted(p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file() and p.name != LOCK)


def _run_command(command: str, stores: dict, damaged: Path, work: Path):
    """Run `command` with the damaged store in it; returns (result, output equals the clean one)."""
    if command == "build":
        res = _invoke("build", damaged, "--out", work / "site")
        return res, res.exit_code == 0 and _tree(work / "site") == stores["site"]
    if command == "merge":
        res = _invoke("merge", damaged, stores["shards"][1], "--out", work / "merged")
        return res, res.exit_code == 0 and _same_tables(_store_tables(work / "merged"), stores["merged"])
    res = _invoke(
        "explain", damaged, "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--neurons", "1", "--dry-run"
    )
    return res, res.exit_code == 0 and res.stdout == stores["explain"]


def _same_tables(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] if not hasattr(a[k], "equals") else a[k].equals(b[k]) for k in a)


@pytest.mark.parametrize("command", ["build", "merge", "explain"])
def test_damaged_store_files_give_one_line(command, stores, tmp_path):
    source = stores["shards"][0] if command == "merge" else stores["whole"]
    harmless = []
    for rel in _files(source):
        for damage in FILE_DAMAGE:
            work = tmp_path / f"{rel.replace('/', '_')}-{damage.__name__}"
            damaged = work / "store"
            shutil.copytree(source, damaged)
            damage(damaged / rel)
            res, same = _run_command(command, stores, damaged, work)
            if same and damage.__name__.startswith("flip"):  # a flip no reader depends on: the output is unchanged
                harmless.append(f"{rel} {damage.__name__}")
                continue
            if damage is _delete and rel.startswith(
                "neuron2graph/"
            ):  # graphs cover some layers: a layer without any is a valid store
                assert res.exit_code == 0, res.output
                continue
            line = _assert_one_line_error(res)
            assert "Traceback" not in res.output
            if rel != "manifest.json" and damage is not _delete:
                assert rel.split("/")[-1] in line or rel.split("/")[0] in line, (
                    line
                )  # the message names the damaged file
            shutil.rmtree(work)
    # Flips of bytes that matter (data pages carry checksums) are caught; only a few footer bytes are unused.
    assert len(harmless) <= len(_files(source)), harmless


@pytest.mark.parametrize("command", ["build", "merge", "explain"])
def test_edited_manifest_fields_give_one_line(command, stores, tmp_path):
    source = stores["shards"][0] if command == "merge" else stores["whole"]
    for edit, field in MANIFEST_EDITS:
        work = tmp_path / edit.__name__.replace("/", "_")[:60]
        damaged = work / "store"
        shutil.copytree(source, damaged)
        manifest = orjson.loads((damaged / "manifest.json").read_bytes())
        edit(manifest)
        (damaged / "manifest.json").write_bytes(orjson.dumps(manifest))
        res, _ = _run_command(command, stores, damaged, work)
        line = _assert_one_line_error(res, "manifest.json")
        assert f"'{field}" in line, (edit.__name__, line)
        shutil.rmtree(work)


def test_manifest_that_is_not_an_object(stores, tmp_path):
    damaged = tmp_path / "store"
    shutil.copytree(stores["whole"], damaged)
    for text in (b"[]", b"42", b"null", b'{"schema_version": 1}'):
        (damaged / "manifest.json").write_bytes(text)
        _assert_one_line_error(_invoke("build", damaged, "--out", tmp_path / "site"))


# -- checkpoints ----------------------------------------------------------------------------


@pytest.mark.model
@pytest.mark.skipif(not HAS_TORCH, reason="needs the compute extra")
def test_damaged_checkpoint_gives_one_line_and_is_kept(tiny_model_dir, tiny_corpus, tmp_path):
    """A resumed `compute` over a damaged checkpoint: one line, the file left as it was (the user
    decides), and once the checkpoint is deleted the same command runs from the start."""
    from sitegen.compute.runner import ComputeConfig, _save_checkpoint, run_compute
    from sitegen.errors import StoreError
    from tests.reference import interrupt_after

    out = tmp_path / "store"
    args = [
        "compute",
        "--model",
        tiny_model_dir,
        "--corpus",
        tiny_corpus,
        "--out",
        out,
        "--tokens",
        "600",
        "--seq-len",
        "16",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--quiet",
    ]
    cfg = ComputeConfig(
        model=str(tiny_model_dir),
        corpus=str(tiny_corpus),
        out=out,
        tokens=600,
        seq_len=16,
        batch_size=4,
        device="cpu",
        progress=False,
    )
    with pytest.raises(StoreError, match="interrupted after 8 of"):
        run_compute(cfg, log=lambda m: None, progress=interrupt_after(2))
    checkpoint = out / ".work" / "checkpoint-0of1.npz"
    intact = checkpoint.read_bytes()
    arrays = dict(np.load(checkpoint))
    sum_fx = next(
        k for k in arrays if k.startswith("1/") and k.endswith("/sum_fx")
    )  # a layer's entries, under its service's name
    vmax = next(k for k in arrays if k.startswith("0/") and k.endswith("/vmax"))

    def resave(entries: dict) -> None:
        with open(checkpoint, "wb") as f:
            np.savez(f, **entries)

    damages = {
        "truncated": lambda: checkpoint.write_bytes(intact[: len(intact) // 2]),
        "flipped": lambda: checkpoint.write_bytes(
            intact[: len(intact) // 2]
            + bytes(b ^ 0xFF for b in intact[len(intact) // 2 :][:8])
            + intact[len(intact) // 2 + 8 :]
        ),
        "not a zip": lambda: checkpoint.write_bytes(b"hello, world\n" * 10),
        # another model's checkpoint, with more layers: used to raise IndexError before the run check
        "more layers": lambda: _save_checkpoint(
            checkpoint, [{"count": np.array(1)} for _ in range(5)], 3, 48, "sha256:other-run"
        ),
        "an entry missing": lambda: resave({k: v for k, v in arrays.items() if k != sum_fx}),
        "a layer too many": lambda: resave({**arrays, "3/count": np.array(1)}),
        "a wrong shape": lambda: resave({**arrays, vmax: np.zeros(3, np.float32)}),
        "position past the end": lambda: resave({**arrays, "position": np.array(10_000)}),
    }
    for name, damage in damages.items():
        damage()
        damaged = checkpoint.read_bytes()
        line = _assert_one_line_error(_invoke(*args))
        assert str(out / ".work") in line, (name, line)
        assert checkpoint.read_bytes() == damaged, name  # nothing deleted or overwritten
        assert not (out / "manifest.json").exists()
    checkpoint.unlink()
    res = _invoke(*args)
    assert res.exit_code == 0, res.output
    assert Store.open(out).manifest["processed"]["tokens"] > 0

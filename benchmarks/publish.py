"""The build's write path alone: sitegen.site.publisher.Publisher writing, rewriting and deleting N
small files in a tree of folders shaped like a site's (no rendering), microseconds per file.

    python benchmarks/publish.py [--files 20000] [--folders 200] [--size 2000] [--repeat 7] [--dir /dev/shm]

Four phases, each in a new Publisher as a build would make them: a fresh build into an empty folder
(files written in place), a rebuild with the same bytes (each file compared, none written), a
rebuild with other bytes (each written to a temporary name and renamed), and a build that writes
none of them (each deleted as stale, its empty folder pruned). It times whatever sitegen is first on
the import path, so the same command with PYTHONPATH set to another checkout compares two versions
of the publisher (benchmarks/README.md, Build).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import sitegen
from sitegen.site.publisher import Publisher


def one_round(root: Path, files: list[str], size: int) -> dict[str, float]:
    first, second = b"a" * size, b"b" * size
    seconds = {}
    t0 = time.perf_counter()
    pub = Publisher(root)
    for rel in files:
        pub.publish(rel, first)
    seconds["fresh"] = time.perf_counter() - t0
    for phase, data in (("unchanged", first), ("changed", second)):
        t0 = time.perf_counter()
        pub = Publisher(root, previous=frozenset(files))
        for rel in files:
            pub.publish(rel, data)
        seconds[phase] = time.perf_counter() - t0
        assert (pub.written, pub.unchanged) == ((0, len(files)) if phase == "unchanged" else (len(files), 0))
    t0 = time.perf_counter()
    pub = Publisher(root, previous=frozenset(files))
    removed = pub.finish()
    seconds["delete"] = time.perf_counter() - t0
    assert removed == len(files)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--folders", type=int, default=200, help="files are spread over this many folders, two levels deep")
    ap.add_argument("--size", type=int, default=2000, help="bytes per file")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (e.g. /dev/shm, to leave the disk out)")
    args = ap.parse_args()
    files = [f"m/{i % args.folders // 10}/{i % args.folders}/{i}.json" for i in range(args.files)]
    rounds = []
    for _ in range(args.repeat):
        root = Path(tempfile.mkdtemp(dir=args.dir, prefix="sitegen-publish-"))
        try:
            rounds.append(one_round(root / "site", files, args.size))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"sitegen from {Path(sitegen.__file__).parent}: {args.files:,} files of {args.size:,} bytes in {args.folders} folders, "
        f"median of {args.repeat} rounds (min-max), microseconds per file:"
    )
    for phase in ("fresh", "unchanged", "changed", "delete"):
        per_file = sorted(r[phase] / args.files * 1e6 for r in rounds)
        print(f"  {phase:9} {statistics.median(per_file):6.1f}  ({per_file[0]:.1f}-{per_file[-1]:.1f})")


if __name__ == "__main__":
    main()

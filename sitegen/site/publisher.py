"""Every file the build writes goes through one Publisher: atomic writes, no path written twice,
unchanged files left alone (so a rebuild touches only what changed and keeps mtimes), counts."""

from __future__ import annotations

import errno
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from sitegen.errors import BuildError


@dataclass
class Publisher:
    root: Path
    written: int = 0
    unchanged: int = 0
    bytes_written: int = 0
    _seen: set = field(default_factory=set)
    _dirs: set = field(default_factory=set)
    _caseless: dict = field(default_factory=dict)  # caseless key of every path and folder -> the path
    _caseless_dirs: set = field(default_factory=set)  # folders already in _caseless

    def publish(self, rel: str, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        if rel in self._seen:
            raise BuildError(f"two outputs want the same path {rel}; rename one of the models or pages")
        self._seen.add(rel)
        self._check_portable(rel)
        path = self.root / rel
        parent = path.parent
        if parent not in self._dirs:
            parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(parent)
        try:
            try:
                same_size = os.stat(path).st_size == len(data)
            except FileNotFoundError:
                same_size = False
            if same_size and path.read_bytes() == data:
                self.unchanged += 1
                return
            tmp = parent / f".{path.name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise BuildError(f"disk full while writing {path}; free space and rebuild (unchanged files are skipped)") from None
            raise BuildError(f"cannot write {path}: {e.strerror or e}") from None
        self.written += 1
        self.bytes_written += len(data)

    def _check_portable(self, rel: str) -> None:
        """Refuse two outputs that are one file on macOS or Windows: paths (or folders on the way)
        equal under Unicode's canonical caseless match, NFD(casefold(NFD(x))). Such file systems,
        and hosts built on them, would keep one and silently drop the other."""
        parts = rel.split("/")
        for depth in range(len(parts), 0, -1):
            prefix = "/".join(parts[:depth])
            if depth < len(parts) and prefix in self._caseless_dirs:
                break  # this folder and those above it were checked for an earlier file
            key = unicodedata.normalize("NFD", unicodedata.normalize("NFD", prefix).casefold())
            other = self._caseless.setdefault(key, prefix)
            if other != prefix:
                raise BuildError(f"two outputs differ only in letter case or Unicode normalisation, {other!r} and {prefix!r}: "
                                 "macOS and Windows would store them as one; rename one of the models or pages")
            if depth < len(parts):
                self._caseless_dirs.add(prefix)

    def remove_stale(self) -> int:
        """Delete files under root that this build did not publish (a neuron or model that went away)."""
        removed = 0
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                rel = os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/")
                if rel not in self._seen:
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
        return removed

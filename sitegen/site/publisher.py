"""Every file the build writes goes through one Publisher: atomic writes, no path written twice,
unchanged files left alone (so a rebuild touches only what changed and keeps mtimes), counts."""

from __future__ import annotations

import errno
import os
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

    def publish(self, rel: str, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        if rel in self._seen:
            raise BuildError(f"two outputs want the same path {rel}; rename one of the models or pages")
        self._seen.add(rel)
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

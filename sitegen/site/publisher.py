"""Every file the build writes goes through one Publisher: atomic writes, no path written twice,
unchanged files left alone (so a rebuild touches only what changed and keeps mtimes), counts.

`open_output` is how `sitegen build` gets its Publisher. It owns the output folder's safety:

- one writer at a time: an exclusive flock on the folder itself (released by the kernel when the
  build exits or is killed); a second build into the same folder fails at once;
- a build deletes only files a build wrote: `.sitegen-build.json` (the record, written last) lists
  the files of the last finished build, and `.sitegen-build.journal` lists, before each is created,
  every file a running build adds to that list. A finished build deletes the recorded or journaled
  files it did not write again (gone neurons, models), writes the new record, drops the journal;
- a folder it cannot vouch for is refused with one line: a store, a source checkout, a non-empty
  folder without a record (an old build included);
- nothing outside the folder is touched: the record and the journal are input (a restored CI cache,
  a shared folder), so each path they list must be a plain relative path (no `..`, no absolute path,
  no empty or `.` segment, no backslash or NUL) or the build is refused; and no write or delete
  goes through a symbolic link inside the folder: every folder on the way is checked to be a real
  folder (lstat, once per folder), files are opened with O_NOFOLLOW, and a link where the build
  writes is refused (a link the build no longer writes is unlinked: that removes the link, never
  its target). The folder given as --out may itself be a link: the user chose it. The threat is
  what lies in the folder before the build; another process changing it during the build (the
  flock is advisory) is not guarded against.

Crash consistency without fsync per file (about 10x the cost of the write and rename: `python
benchmarks/build.py`, benchmarks/README.md): a file that replaces one is written to a hidden unique
temporary name and renamed into place, so a reader never sees half of it and a `kill -9` leaves it
either old or new, whole. A file in a folder this build created has no old version to keep, so it is
written in place (O_EXCL; the rename cost ~8% of a fresh build's time on tmpfs): a kill can leave it
short, and only there. The journal survives such a kill (it is the kernel's after each write), so
the rerun knows the folder is its own, removes the hidden temporaries, and, since every build
compares each file's bytes with what it wants, rewrites exactly what the killed build had not
finished, short files included: the result is byte-identical to a clean build. The site is derived
data, so after a power loss a rerun repairs it the same way.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import re
import stat
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import orjson

import sitegen
from sitegen.errors import BuildError

NETLIFY_DIR_LIMIT = 54_000  # Netlify refuses a deploy with more files than this in one folder
RECORD = ".sitegen-build.json"
JOURNAL = ".sitegen-build.journal"
TMP_SUFFIX = ".sitegen-tmp"  # hidden names ".<pid>-<n>.sitegen-tmp": only a build creates them
_NAMES_SITEGEN = re.compile(r"""^\s*name\s*=\s*["']sitegen["']""", re.MULTILINE)
# A file the build creates: never one that is there already, never through a link planted at its name.
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW


@dataclass
class Publisher:
    root: Path
    previous: frozenset = frozenset()  # files earlier builds wrote here: the only ones finish() may delete
    journal_fd: int | None = None  # open_output's journal; None for a bare writer (benchmarks)
    check_portable: bool = True  # off in a build's workers: the main process checks what they adopt()
    written: int = 0
    unchanged: int = 0
    bytes_written: int = 0
    bytes_total: int = 0  # the size of every published file, written or unchanged
    _seen: set = field(default_factory=set)
    _dirs: set = field(default_factory=set)
    _fresh: set = field(default_factory=set)  # folders this build created: no file there can be unchanged
    _caseless: dict = field(default_factory=dict)  # caseless key of every path and folder -> the path
    _caseless_dirs: set = field(default_factory=set)  # folders already in _caseless
    _tmp_names: Iterator[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        # The hot path works on strings: a Path per file costs more than the write itself on tmpfs.
        self._base = os.path.join(str(self.root), "")
        self._tmp_prefix = f"/.{os.getpid()}-"
        self._root_dir = (self._base + "x").rpartition("/")[0]

    def publish(self, rel: str, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        if rel in self._seen:
            raise BuildError(f"two outputs want the same path {rel}; rename one of the models or pages")
        self._seen.add(rel)
        if self.check_portable:
            self._check_portable(rel)
        self.bytes_total += len(data)
        path = self._base + rel
        parent = path.rpartition("/")[0]
        tmp = fd = None
        try:
            if parent not in self._dirs:
                self._make_dir(parent)
            fresh = parent in self._fresh  # a folder this build created holds nothing to compare with
            if not fresh and self._holds(path, data):
                self.unchanged += 1
                return
            if self.journal_fd is not None and rel not in self.previous:
                # Journaled before it exists: a build killed from here on still knows the file is its own.
                os.write(self.journal_fd, orjson.dumps(rel) + b"\n")
            if fresh:  # no old version for a reader to keep: written in place, see the module's docstring
                fd = os.open(path, _NEW_FILE, 0o644)
            else:
                tmp = f"{parent}{self._tmp_prefix}{next(self._tmp_names)}{TMP_SUFFIX}"
                try:
                    fd = os.open(tmp, _NEW_FILE, 0o644)
                except FileExistsError:  # left by a killed process of the same pid (or planted): never opened through
                    _unlink(tmp)
                    fd = os.open(tmp, _NEW_FILE, 0o644)
            try:
                done = os.write(fd, data)
                if done < len(data):  # a short write (a signal, a full pipe of a FUSE mount): finish it
                    view = memoryview(data)[done:]
                    while view:
                        view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            if tmp is not None:
                os.replace(tmp, path)
        except OSError as e:
            if tmp is not None:
                _unlink(tmp)
            elif fd is not None:  # a short file written in place: gone rather than left for the rerun to find
                _unlink(path)
            if e.errno == errno.ELOOP:  # O_NOFOLLOW met a link planted after the checks
                raise self._linked(path) from None
            where = self.root / rel
            if e.errno == errno.ENOSPC:
                raise BuildError(
                    f"disk full while writing {where}; free space and rebuild (unchanged files are skipped)"
                ) from None
            raise BuildError(f"cannot write {where}: {e.strerror or e}") from None
        self.written += 1
        self.bytes_written += len(data)

    def for_worker(self) -> "Publisher":
        """A Publisher for a build's worker process: the same folder, record and journal (an
        O_APPEND descriptor, so the processes' lines never mix), its own counts and paths, which
        the main process takes over with adopt()."""
        return Publisher(self.root, previous=self.previous, journal_fd=self.journal_fd, check_portable=False)

    def published(self) -> list[str]:
        return list(self._seen)

    def adopt(self, files: list[str], written: int, unchanged: int, bytes_written: int, bytes_total: int) -> None:
        """Take over what a worker's Publisher published: the same checks publish() makes (no path
        twice, portable names), then its counts, so the record lists the worker's files too."""
        for rel in files:
            if rel in self._seen:
                raise BuildError(f"two outputs want the same path {rel}; rename one of the models or pages")
            self._seen.add(rel)
            self._check_portable(rel)
        self.written += written
        self.unchanged += unchanged
        self.bytes_written += bytes_written
        self.bytes_total += bytes_total

    def largest_folder(self) -> tuple[str, int]:
        """The folder holding the most of this build's files, and how many (hosts limit files per
        folder: Netlify refuses a deploy over 54,000)."""
        counts: dict[str, int] = {}
        for rel in self._seen:
            folder = rel.rpartition("/")[0]
            counts[folder] = counts.get(folder, 0) + 1
        return max(counts.items(), key=lambda kv: (kv[1], kv[0]), default=("", 0))

    def _make_dir(self, folder: str) -> None:
        """Create folder and any missing parents, top-down from the root, noting which this build
        created; refuse one on the way that is a symbolic link (a write there would land wherever
        it points) or that would leave the root (a `.` or `..` segment)."""
        if (
            folder == self._root_dir
        ):  # trusted (the user named it), a link or not; open_output made it, a bare Publisher may not have
            os.makedirs(folder, exist_ok=True)
            self._dirs.add(folder)
            return
        up, _, name = folder.rpartition("/")
        if name in ("", ".", "..") or not folder.startswith(self._base):
            raise BuildError(
                f"refusing to write under {folder!r}: not a plain path inside --out {self.root}; rename the model or page"
            )
        if up not in self._dirs:
            self._make_dir(up)
        try:
            os.mkdir(folder)
            self._fresh.add(folder)
        except FileExistsError:  # there already (or another worker of this build made it): a real folder?
            if stat.S_ISLNK(os.lstat(folder).st_mode):
                raise self._linked(folder) from None
            # a file in its place fails at the write
        self._dirs.add(folder)

    def _real_folder(self, folder: str) -> bool:
        """Whether folder and every folder above it up to the root exist as real folders; raises
        on a symbolic link among them. For deletes: a link on the way would delete its target's files."""
        if folder in self._dirs or folder == self._root_dir:
            return True
        up = folder.rpartition("/")[0]
        if not self._real_folder(up):
            return False
        try:
            mode = os.lstat(folder).st_mode
        except FileNotFoundError:
            return False
        if stat.S_ISLNK(mode):
            raise self._linked(folder)
        if not stat.S_ISDIR(mode):
            return False
        self._dirs.add(folder)
        return True

    def _holds(self, path: str, data: bytes) -> bool:
        """Whether the file at path has exactly these bytes (the size first: most changed files
        differ there); refuses a symbolic link there."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if stat.S_ISLNK(st.st_mode):
            raise self._linked(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size != len(data):
            return False  # a folder or special file in its place: the rename fails, or replaces it
        try:
            with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
                return f.read() == data
        except FileNotFoundError:  # gone since the lstat: written anew
            return False

    def _prune_empty_parents(self, folder: str) -> None:
        """Remove folder and the folders above it while they are empty, never the root (each was
        checked to be a real folder inside it: _real_folder)."""
        while folder.startswith(self._base):
            try:
                os.rmdir(folder)
            except OSError:  # not empty (or gone): stop
                return
            self._dirs.discard(folder)
            self._fresh.discard(folder)
            folder = folder.rpartition("/")[0]

    def _linked(self, path: str) -> BuildError:
        return _link_refused(self.root, path[len(self._base) :] or ".", path)

    def _check_portable(self, rel: str) -> None:
        """Refuse two outputs that are one file on macOS or Windows: paths (or folders on the way)
        equal under Unicode's canonical caseless match, NFD(casefold(NFD(x))). Such file systems,
        and hosts built on them, would keep one and silently drop the other."""
        parts = rel.split("/")
        for depth in range(len(parts), 0, -1):
            prefix = "/".join(parts[:depth])
            if depth < len(parts) and prefix in self._caseless_dirs:
                break  # this folder and those above it were checked for an earlier file
            # ASCII (nearly every path): NFD leaves it as it is and casefold is lower()
            key = (
                prefix.lower()
                if prefix.isascii()
                else unicodedata.normalize("NFD", unicodedata.normalize("NFD", prefix).casefold())
            )
            other = self._caseless.setdefault(key, prefix)
            if other != prefix:
                raise BuildError(
                    f"two outputs differ only in letter case or Unicode normalisation, {other!r} and {prefix!r}: "
                    "macOS and Windows would store them as one; rename one of the models or pages"
                )
            if depth < len(parts):
                self._caseless_dirs.add(prefix)

    def finish(self) -> int:
        """Delete the files earlier builds wrote that this one did not (a neuron or model that went
        away), then record this build's files and drop the journal. Returns how many were deleted."""
        stale = sorted(self.previous - self._seen - {RECORD})
        for rel in stale:  # each a plain relative path: _read_record and _read_journal refuse the rest
            path = self._base + rel
            parent = path.rpartition("/")[0]
            if not self._real_folder(parent):  # its folder is gone, or is a file: nothing to delete
                continue
            try:
                os.unlink(path)  # a link there is removed itself, never its target
            except FileNotFoundError:
                continue
            except IsADirectoryError:  # a folder now stands there: not a file a build wrote, left alone
                continue
            except OSError as e:
                raise BuildError(
                    f"cannot delete {path}, which an earlier build wrote: {e.strerror or e}; "
                    "fix its permissions and build again"
                ) from None
            self._prune_empty_parents(parent)
        files = sorted(self._seen)
        self.publish(
            RECORD,
            orjson.dumps(
                {
                    "about": "files written by 'sitegen build'; a later build deletes only these, when it no longer writes them",
                    "files": files,
                },
                option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS,
            )
            + b"\n",
        )
        if self.journal_fd is not None:
            _unlink(self.root / JOURNAL)
        return len(stale)


@contextmanager
def open_output(root: Path, stores: list[Path]) -> Iterator[Publisher]:
    """Lock the output folder, refuse one that is not safe to write, recover from a killed build,
    and yield the Publisher that writes it. The caller ends with pub.finish()."""
    if root.exists() and not root.is_dir():
        raise BuildError(f"--out {root} is a file; pass a folder (it is created if missing)")
    _refuse_foreign(root, stores, check_empty=False)  # before mkdir: refuse a store or checkout untouched
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise BuildError(f"cannot create --out {root}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise BuildError(
                    f"another 'sitegen build' is writing --out {root} right now; wait for it to finish, or pass another --out"
                ) from None
            raise BuildError(
                f"cannot lock --out {root} ({e.strerror or e}); build into a folder on a local disk"
            ) from None
        _refuse_foreign(root, stores, check_empty=True)  # again under the lock: nothing changes it now
        previous = _read_record(root)
        if os.path.lexists(root / JOURNAL):  # the last build did not finish: its files are ours too
            previous |= _read_journal(root)
            _remove_temporaries(root)
        try:
            journal_fd = os.open(root / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise _link_refused(root, JOURNAL, root / JOURNAL) from None
            raise BuildError(f"cannot write {root / JOURNAL}: {e.strerror or e}") from None
        try:
            yield Publisher(root, previous=frozenset(previous), journal_fd=journal_fd)
        finally:
            os.close(journal_fd)
    finally:
        os.close(lock_fd)  # releases the lock


def _refuse_foreign(root: Path, stores: list[Path], check_empty: bool) -> None:
    """Raise a one-line BuildError if root is not a folder a build may write into."""
    if not root.is_dir():
        return
    fix = "pass a folder of its own, e.g. --out build"
    if (root / "manifest.json").exists() or (root / ".work").exists():
        raise BuildError(f"--out {root} is a sitegen store, not a site folder: building there would mix the two; {fix}")
    resolved = root.resolve()
    for store in stores:
        s = Path(store).resolve()
        if s == resolved or resolved in s.parents:
            raise BuildError(f"--out {root} contains the store {store}, which would be published with the site; {fix}")
    for child in _entries(root):
        if child.is_dir() and _is_store(child):
            raise BuildError(
                f"--out {root} contains the sitegen store {child.name}/, which would be published with the site; {fix}"
            )
    package = Path(sitegen.__file__).resolve().parent
    if resolved == package or resolved in package.parents:
        raise BuildError(f"--out {root} contains sitegen itself ({package}); {fix}")
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and _NAMES_SITEGEN.search(_read_text(pyproject)):
        raise BuildError(f"--out {root} is sitegen's source tree (its pyproject.toml names sitegen); {fix}")
    if not check_empty or (root / RECORD).exists() or (root / JOURNAL).exists():
        return
    names = {p.name for p in _entries(root)}
    if not names:
        return
    if ".git" in names or "pyproject.toml" in names:
        what = ".git" if ".git" in names else "pyproject.toml"
        raise BuildError(
            f"--out {root} looks like a source checkout (it has {what}); a build writes only into an empty folder "
            f"or one it built before; {fix}"
        )
    if {"index.html", "api"} <= names:
        raise BuildError(
            f"--out {root} holds a site built by an older sitegen, which kept no record ({RECORD}) of its files; "
            f"delete it (rm -r {root}) and build again"
        )
    raise BuildError(
        f"--out {root} is not empty and no build recorded its files ({RECORD}); a build deletes only files it wrote, "
        f"so pass an empty or new folder, e.g. --out build"
    )


def _is_store(path: Path) -> bool:
    try:
        return "schema_version" in orjson.loads((path / "manifest.json").read_bytes())
    except (OSError, orjson.JSONDecodeError, TypeError):
        return False


def _entries(root: Path) -> list[Path]:
    try:
        return list(root.iterdir())
    except OSError as e:
        raise BuildError(f"cannot read --out {root}: {e.strerror or e}") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _plain_relative(rel: object) -> bool:
    """Whether rel is a normalised relative POSIX path: the only kind a build writes, so the only
    kind a record or journal (input: it may come from a cache or another machine) may list."""
    return (
        isinstance(rel, str)
        and rel != ""
        and not rel.startswith("/")
        and "\\" not in rel
        and "\0" not in rel
        and all(part not in ("", ".", "..") for part in rel.split("/"))
    )


def _refuse_outside(path: Path, root: Path, rel: object) -> BuildError:
    return BuildError(
        f"{path} lists {rel!r}, which is not a plain relative path inside --out (a build deletes only files in "
        f"{root}); remove that entry, or delete the folder (rm -r {root}) and build again"
    )


def _link_refused(root: Path, rel: str, path: str | Path) -> BuildError:
    try:
        target = f" (to {os.readlink(path)})"
    except OSError:
        target = ""
    return BuildError(
        f"--out {root}: {rel} is a symbolic link{target}; a build never writes or deletes through a link inside "
        f"its folder: remove the link (rm {path}) and build again"
    )


def _read_own(root: Path, name: str) -> bytes:
    """The bytes of the record or journal: never through a link, never a FIFO or device (it could block)."""
    path = root / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _link_refused(root, name, path) from None
        raise BuildError(
            f"cannot read {path}: {e.strerror or e}; delete the folder (rm -r {root}) and build again"
        ) from None
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BuildError(f"{path} is not a regular file; delete it and build again")
        return f.read()


def _read_record(root: Path) -> set[str]:
    path = root / RECORD
    if not os.path.lexists(path):
        return set()
    try:
        files = orjson.loads(_read_own(root, RECORD))["files"]
        if not isinstance(files, list):
            raise TypeError("'files' is not a list")
    except (orjson.JSONDecodeError, KeyError, TypeError) as e:
        raise BuildError(
            f"{path}: unreadable build record ({e}); delete the folder (rm -r {root}) and build again"
        ) from None
    for rel in files:
        if not _plain_relative(rel):
            raise _refuse_outside(path, root, rel)
    return set(files)


def _read_journal(root: Path) -> set[str]:
    path = root / JOURNAL
    files = set()
    for line in _read_own(root, JOURNAL).splitlines():
        try:
            rel = orjson.loads(line)
        except orjson.JSONDecodeError:  # a line cut by a kill: its file was never created
            continue
        if not _plain_relative(rel):
            raise _refuse_outside(path, root, rel)
        files.add(rel)
    return files


def _remove_temporaries(root: Path) -> None:
    """The hidden temporaries a killed build left (only a build makes names ending in TMP_SUFFIX)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                _unlink(Path(dirpath) / name)


def _unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

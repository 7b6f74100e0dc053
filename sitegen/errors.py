"""Categorised errors. The library raises these; the CLI prints one line and exits non-zero.

Every message names the file or option at fault and the fix, because users read only the one line.
"""


class SitegenError(Exception):
    """Base class: a problem the user can fix (bad input, missing package, full disk)."""

    exit_code = 1
    stage = "sitegen"

    def __str__(self) -> str:  # one line, always
        return " ".join(str(self.args[0]).split()) if self.args else self.stage


class ConfigError(SitegenError):
    stage = "config"
    exit_code = 2


class CorpusError(SitegenError):
    stage = "corpus"


class ModelError(SitegenError):
    stage = "model"


class StoreError(SitegenError):
    stage = "store"


class DiskFull(StoreError):
    """A store write hit a full disk; `path` is the file. Callers that know what a rerun does
    (merge starts over, compute resumes) say so."""

    def __init__(self, message: str, path=None):
        super().__init__(message)
        self.path = path


class BuildError(SitegenError):
    stage = "build"


class MissingDependency(SitegenError):
    """An optional heavy component is not installed; the message names the package."""

    stage = "dependency"

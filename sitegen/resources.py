"""Where the files that ship with sitegen but live at the repository's top level are found.

The repository keeps `themes/`, `content/` and `netlify.toml` at its root, where users and Netlify
look for them. A wheel carries copies under `sitegen/_data/` (setup.py's build step maps them into
the package), so an installed sitegen finds them next to its code; an editable checkout finds them
at the repository root. One lookup, so no other module guesses a path.
"""

from __future__ import annotations

from pathlib import Path

from sitegen.errors import BuildError

_PACKAGE = Path(__file__).resolve().parent
_PACKAGED = _PACKAGE / "_data"  # filled by setup.py when a wheel or sdist is built
_CHECKOUT = _PACKAGE.parent  # the repository root of an editable checkout
SHIPPED = ("themes", "content", "netlify.toml", "netlify")


def resource(name: str) -> Path:
    """The path of a shipped top-level file or folder ('themes', 'content', 'netlify.toml', and
    'netlify', whose edge-functions/ Netlify bundles from beside netlify.toml)."""
    if name not in SHIPPED:
        raise ValueError(f"not a shipped resource: {name}")
    for base in (_PACKAGED, _CHECKOUT):
        path = base / name
        if path.exists():
            return path
    raise BuildError(f"sitegen's {name} is missing from {_PACKAGED} and {_CHECKOUT}; reinstall sitegen")


def default_theme() -> Path:
    return resource("themes") / "default"

"""sitegen as users install it: a wheel in a fresh virtual environment outside the checkout, and a
user's theme folder overriding single files of the default theme."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port
from tests.reference import write_synthetic_store

ROOT = Path(__file__).resolve().parents[1]
MODEL = "toy-model"


def _source_copy(dest: Path) -> Path:
    """The tracked files of the checkout (what a clone or an sdist holds), so building the wheel
    leaves no build/ or egg-info in the checkout."""
    listed = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    )
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = _source_copy(tmp_path_factory.mktemp("src"))  # built in an isolated environment, as pip builds it for a user
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    (whl,) = out.glob("sitegen-*.whl")
    return whl


def test_wheel_ships_theme_content_and_the_same_url_rules(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert z.read("sitegen/_data/netlify.toml") == (ROOT / "netlify.toml").read_bytes()  # one source for the rules
        for path in (ROOT / "themes").rglob("*"):
            if path.is_file():
                assert z.read(f"sitegen/_data/{path.relative_to(ROOT).as_posix()}") == path.read_bytes()
        assert {f"sitegen/_data/content/{p.name}" for p in (ROOT / "content").glob("*.md")} <= names
        partials = list(
            (ROOT / "sitegen" / "services").glob("*/templates/*/*.html")
        )  # a built-in service's partials, in its folder
        assert len(partials) >= 4
        for path in partials:
            assert z.read(path.relative_to(ROOT).as_posix()) == path.read_bytes()
        modules = list((ROOT / "sitegen" / "services").glob("*/*.ts"))  # a service's edge functions, in its folder
        assert modules
        for path in modules:
            assert z.read(path.relative_to(ROOT).as_posix()) == path.read_bytes()
        version = next(n for n in names if n.endswith(".dist-info/METADATA"))
        import sitegen

        assert f"Version: {sitegen.__version__}" in z.read(version).decode()  # one place for the version


def test_installed_wheel_builds_and_serves_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    # The dependencies come from this interpreter's site-packages; sitegen itself only from the wheel
    # (--ignore-installed: an editable sitegen in those site-packages must not satisfy the install).
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    bindir = venv / "bin"
    subprocess.run(
        [bindir / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
        check=True,
        capture_output=True,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    work = tmp_path / "work"  # outside the checkout: nothing of the repository is reachable from here
    work.mkdir()
    where = subprocess.run(
        [
            bindir / "python",
            "-c",
            "import sitegen, sitegen.resources as r; print(sitegen.__file__); print(r.resource('themes'))",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where

    store = write_synthetic_store(work / "store")
    subprocess.run(
        [bindir / "sitegen", "build", str(store.root), "--out", str(work / "site")],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
    )
    assert (work / "site" / "about.html").exists() and (work / "site" / "api.html").exists()  # content pages shipped

    port = free_port()
    server = subprocess.Popen(
        [bindir / "sitegen", "serve", str(work / "site"), "--port", str(port)],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                requests.get(base + "/", timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        page = requests.get(f"{base}/{MODEL}/1/2", timeout=5)  # a pretty URL: needs the shipped rules
        assert page.status_code == 200 and "<html" in page.text
        api = requests.get(f"{base}/api/{MODEL}/neuroscope/1/2", timeout=5)
        assert api.status_code == 200 and api.headers["Access-Control-Allow-Origin"] == "*"
        assert api.json()["data"]["neuron_index"] == {"layer": 1, "neuron": 2}
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_theme_overrides_one_partial_and_one_static_file(tmp_path, synthetic_store):
    from sitegen.site.build import build_site

    theme = tmp_path / "mytheme"
    partial = theme / "templates" / "services" / "logits.html"
    partial.parent.mkdir(parents=True)
    partial.write_text('<section class="mine"><p id="my-logits">logits by my theme</p></section>\n')
    (theme / "static").mkdir()
    (theme / "static" / "style.css").write_text("body { color: rebeccapurple }\n")
    build_site([synthetic_store.root], tmp_path / "site", theme=theme)
    page = (tmp_path / "site" / MODEL / "1" / "2.html").read_text()
    assert '<p id="my-logits">logits by my theme</p>' in page  # the overridden partial
    assert '<section class="logits"' not in page  # the default partial is replaced, not added to
    assert '<section class="stats"' in page  # other partials still come from the default theme
    (css,) = (tmp_path / "site" / "assets").glob("style.*.css")
    assert css.read_text() == "body { color: rebeccapurple }\n"
    assert len(list((tmp_path / "site" / "assets").glob("app.*.js"))) == 1  # not overridden: the default's


def test_theme_folder_that_is_not_a_theme_is_one_line(tmp_path, synthetic_store):
    from click.testing import CliRunner

    from sitegen.cli import main

    result = CliRunner().invoke(
        main, ["build", str(synthetic_store.root), "--out", str(tmp_path / "site"), "--theme", str(tmp_path)]
    )
    assert result.exit_code != 0
    assert "--theme" in result.output and "templates/" in result.output and "Traceback" not in result.output

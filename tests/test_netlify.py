"""`sitegen serve` against Netlify's own local server (`netlify dev --offline`, the npm package
netlify-cli pinned in tests/netlify/package.json): one small site, both servers on loopback, every
URL class requested from both, and the answers compared (status, Location, Content-Type, the CORS
header, the body; Cache-Control where Netlify's dev server applies the configured value).

Netlify's dev server runs redirects and headers through Netlify's own rule code and the edge
function under Deno, offline: the Deno (npm package `deno`, 2.5.x: the edge runtime needs 2.4-2.5)
and the edge runtime's bootstrap (NETLIFY_EDGE_BOOTSTRAP, from @netlify/edge-functions-dev) come
from tests/netlify/node_modules, which `make install-test` installs.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.netlify

REPO = Path(__file__).resolve().parents[1]
NODE_MODULES = REPO / "tests" / "netlify" / "node_modules"
NETLIFY = NODE_MODULES / ".bin" / "netlify"
BOOTSTRAP = NODE_MODULES / "@netlify" / "edge-functions-dev" / "dist" / "deno" / "bootstrap.mjs"
MODEL = "toy-model"
START_TIMEOUT = 240.0  # seconds for `netlify dev` to answer a page and the edge function (2 shared cores)
REQUEST_TIMEOUT = 30.0


def fetch(base: str, target: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) for TARGET sent exactly as written."""
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=REQUEST_TIMEOUT)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        conn.putheader("Connection", "close")
        conn.endheaders()
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def netlify_project(tmp_path_factory, built_site):
    """A folder laid out as the repository is on Netlify: netlify.toml, netlify/edge-functions/
    (the site's own functions and the entries of the services' ones) and each service's edge
    function module where its hook says it is, beside the publish folder (`build`), which holds the
    small site."""
    from sitegen.site.edge import service_functions

    root = tmp_path_factory.mktemp("netlify-project")
    shutil.copytree(built_site, root / "build")
    shutil.copy(REPO / "netlify.toml", root / "netlify.toml")
    shutil.copytree(REPO / "netlify", root / "netlify")
    for _owner, fn in service_functions().values():
        (root / fn.source.relative_to(REPO)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(fn.source, root / fn.source.relative_to(REPO))
    return root


@pytest.fixture(scope="module")
def netlify_dev(netlify_project, tmp_path_factory):
    """`netlify dev --offline --dir build` on a loopback port, started once for the module (it is
    heavy: Node, Deno and a local database). tests/netlify/loopback.cjs keeps its Node servers on
    127.0.0.1; its Deno edge server listens on a random port on every interface (Deno.serve's
    default, which the CLI offers no option to change) for the lifetime of this fixture."""
    if not NETLIFY.exists() or not BOOTSTRAP.exists():
        pytest.fail(
            f"Netlify's CLI is not installed in {NODE_MODULES}: run `make install-test` "
            f"(or `cd tests/netlify && npm install --ignore-scripts --no-save`)"
        )
    port = free_port()
    home = tmp_path_factory.mktemp("netlify-home")
    env = {
        **os.environ,
        "PATH": f"{NODE_MODULES / '.bin'}{os.pathsep}{os.environ.get('PATH', '')}",  # its Deno 2.5
        "NETLIFY_EDGE_BOOTSTRAP": BOOTSTRAP.as_uri(),
        "NODE_OPTIONS": f"--require {REPO / 'tests' / 'netlify' / 'loopback.cjs'}",
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_CACHE_HOME": str(home / "cache"),
        "DENO_DIR": str(home / "deno"),
        "DENO_NO_UPDATE_CHECK": "1",
        "BROWSER": "none",
        "NETLIFY_TELEMETRY_DISABLED": "1",
        "NO_COLOR": "1",
        "CI": "1",
    }
    log = (home / "netlify-dev.log").open("wb")
    proc = subprocess.Popen(
        [str(NETLIFY), "dev", "--offline", "--dir", "build", "--port", str(port), "--skip-gitignore"],
        cwd=netlify_project,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"netlify dev exited with {proc.returncode}: {(home / 'netlify-dev.log').read_text()[-3000:]}"
                )
            try:
                # Ready once the edge function answers too (Deno starts after the static server).
                status, headers, _ = fetch(base, f"/api/{MODEL}/neuron2graph-search?query=any:the")
                if status == 200 and "x-nf-edge-functions" in headers:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"netlify dev did not serve the edge function within {START_TIMEOUT:.0f} s: "
                    f"{(home / 'netlify-dev.log').read_text()[-3000:]}"
                )
            time.sleep(1.0)
        yield base
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # its process group: the CLI, its static server and Deno
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        log.close()


# ---- the URL classes --------------------------------------------------------------------------

SEARCH = f"/api/{MODEL}/neuron2graph-search"
PAGES = [
    "/",
    "/index.html",
    "/about",
    "/about.html",
    "/search",
    "/search.html",
    "/api.html",
    "/404.html",
    f"/{MODEL}",
    f"/{MODEL}/",
    f"/{MODEL}/index.html",
    f"/{MODEL}/0",
    f"/{MODEL}/0/",
    f"/{MODEL}/0/index.html",
    f"/{MODEL}/0/1",
    f"/{MODEL}/0/1.html",
    f"/{MODEL}/1/3",
    f"/{MODEL}/1/3/",
    "/assets/app.2b6cff958a.js",
    "/assets/style.3f280f8d57.css",
]
API = [
    "/api",
    "/api/",
    "/api/index",
    "/api/index.json",
    "/api/openapi",
    "/api/openapi.json",
    f"/api/{MODEL}",
    f"/api/{MODEL}.json",
    f"/api/{MODEL}/",
    f"/api/{MODEL}/neuroscope",
    f"/api/{MODEL}/neuroscope.json",
    f"/api/{MODEL}/neuroscope/0",
    f"/api/{MODEL}/neuroscope/0.json",
    f"/api/{MODEL}/neuroscope/0/1",
    f"/api/{MODEL}/neuroscope/0/1.json",
    f"/api/{MODEL}/neuron2graph/1/3",
    f"/api/{MODEL}/logits/0/2.json",
    f"/api/{MODEL}/neuron2graph/1",
    f"/api/{MODEL}/all/1/3",
    f"/api/{MODEL}/all/1",
    f"/api/{MODEL}/all",
    f"/api/{MODEL}/neuroscope/0/1/",
]
CHOOSER = [
    f"/{MODEL}/go?layer=0&neuron=1",
    f"/{MODEL}/go?neuron=3&layer=1",
    f"/{MODEL}/go?layer=1&neuron=2&x=y",
    f"/{MODEL}/go/?layer=0&neuron=1",
    f"/{MODEL}/go?layer=0",
    f"/{MODEL}/go",
    f"/{MODEL}/go?layer=9&neuron=9",
    "/nope-model/go?layer=0&neuron=1",
]
SHARDS = [
    f"/search/{MODEL}/meta.json",
    f"/search/{MODEL}/tokens/0.json",
    f"/search/{MODEL}/preview/0/0.json",
    f"/search/{MODEL}/preview/1/0.json",
    f"/search/{MODEL}/tokens/9.json",
    f"/search/{MODEL}/meta",
]
QUERIES = [
    f"{SEARCH}?query=any:w0",
    f"{SEARCH}?query=activating:w5",
    f"{SEARCH}?query=important:w3",
    f"{SEARCH}?query=any:w0,any:w18",
    f"{SEARCH}?query=any:w0,important:w3",
    f"{SEARCH}?query=any:W0",
    f"{SEARCH}?query=%3Cscript%3Ealert(1)%3C%2Fscript%3E",
    f"{SEARCH}?query=any:w0,,any:w5",
    f"{SEARCH}?query=any:the",
    f"{SEARCH}?query=activating:the",
    f"{SEARCH}?query=important:of",
    f"{SEARCH}?query=any:the,any:of",
    f"{SEARCH}?query=any:the,activating:the,any:the",
    f"{SEARCH}?query=any:zzzzqx",
    f"{SEARCH}?query=any:%20the",
    f"{SEARCH}?query=",
    f"{SEARCH}",
    f"{SEARCH}?query=the",
    f"{SEARCH}?query=bogus:the",
    f"{SEARCH}?query=any:",
    f"{SEARCH}?query=%",
    f"{SEARCH}?query=any:%E0%A4",
    f"{SEARCH}?query=any:the&query=any:of",
    f"{SEARCH}/?query=any:the",
    "/api/nope-model/neuron2graph-search?query=any:the",
    f"{SEARCH}.json?query=any:the",
]
NOT_FOUND = [
    "/nope",
    "/nope.html",
    "/nope/",
    f"/{MODEL}/9/9",
    f"/{MODEL}/0/99.html",
    "/assets/nope.css",
    "/search/nope/meta.json",
    f"/{MODEL}/0/1/2/3",
]
HOSTILE = [
    "/%5C%5Cevil.com/go?layer=1&neuron=2",
    "/%5Cevil.com/go?layer=1&neuron=2",
    "/%2F%2Fevil.com/go?layer=1&neuron=2",
    "//evil.com/go?layer=1&neuron=2",
    "/evil.com%5C/go?layer=1&neuron=2",
    "/..%2F..%2Fevil.com/go?layer=1&neuron=2",
    f"/{MODEL}/go?layer=%2F%2Fevil.com&neuron=2",
    f"/{MODEL}/go?layer=%5C%5Cevil.com&neuron=2",
    f"/{MODEL}/go?layer=..%2F..%2F%2Fevil.com&neuron=0",
    f"/{MODEL}/go?layer=-1&neuron=0",
    f"/{MODEL}/go?layer=abc&neuron=0",
    f"/api/{MODEL}/./neuron2graph-search?query=any:the",
    f"/api/{MODEL}/%2e/neuron2graph-search?query=any:the",
    f"/api/{MODEL}/%2E/neuron2graph-search?query=any:the",
    f"/api/./{MODEL}/neuron2graph-search?query=any:the",
    f"/api/x/../{MODEL}/neuron2graph-search?query=any:the",
    f"/api/x/%2e%2e/{MODEL}/neuron2graph-search?query=any:the",
    "/api/%2e%2e/index",
    "/api/../index.html",
    f"/{MODEL}/%2e%2e/about.html",
    f"/{MODEL}/../about.html",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/..%2F..%2Fetc/passwd",
    "/api/..%2F..%2Fetc%2Fpasswd",
    f"/{MODEL}/0/%2e%2e/1/2.html",
    f"/api/{MODEL}%2Fneuroscope%2F0%2F1",
    "/about%2ehtml",
    "/%61bout.html",
    f"/{MODEL}/0/1%2ehtml",
    "/api/%00",
]
# Unknown API URLs: model, service, layer, neuron, a service the model lacks (the toy store has no
# explanations), a level below a neuron; each answers 404 with the API's JSON body on both servers.
API_NOT_FOUND = [
    "/api/nope",
    "/api/nope.json",
    "/api/nope/neuroscope/0/1",
    f"/api/{MODEL}/nope",
    f"/api/{MODEL}/nope/0/1",
    f"/api/{MODEL}/neuroscope/9",
    f"/api/{MODEL}/neuroscope/9/9",
    f"/api/{MODEL}/neuroscope/0/99",
    f"/api/{MODEL}/neuroscope/0/99.json",
    f"/api/{MODEL}/all/9/9",
    f"/api/{MODEL}/neuron2graph/9",
    f"/api/{MODEL}/neuron_explainer/1/0",
    f"/api/{MODEL}/neuron_explainer/1",
    f"/api/{MODEL}/neuron_explainer",
    f"/api/{MODEL}/neuroscope/0/1/2",
]
URLS = PAGES + API + CHOOSER + SHARDS + QUERIES + NOT_FOUND + API_NOT_FOUND + HOSTILE
HEAD = [
    "/",
    "/about",
    "/api",
    "/about.html",
    f"/api/{MODEL}/neuroscope/0/1",
    f"/{MODEL}/go?layer=0&neuron=1",
    f"{SEARCH}?query=any:the",
    "/nope",
    f"/api/{MODEL}/neuroscope/9/9",
]

COMPARED = ("location", "content-type", "access-control-allow-origin")
# Cache-Control values Netlify's dev server sends whatever netlify.toml says (static files get
# max-age=0, redirects no-cache); Cache-Control is compared only where it sends another value.
DEV_OWN_CACHE_CONTROL = {"public, max-age=0", "no-cache"}


def answer(base: str, target: str, method: str = "GET") -> dict:
    """What a client sees: status, the compared headers, Cache-Control, the body; status -1 when
    the connection closed without an answer."""
    try:
        status, headers, body = fetch(base, target, method)
    except (OSError, http.client.HTTPException) as e:
        return {"status": -1, "error": type(e).__name__}
    return {
        "status": status,
        **{name: headers.get(name) for name in COMPARED},
        "cache-control": headers.get("cache-control"),
        "body": body,
    }


def differences(ours: dict, netlify: dict) -> dict:
    keys = set(ours) | set(netlify)
    if netlify.get("cache-control") in DEV_OWN_CACHE_CONTROL:
        keys.discard("cache-control")
    return {k: (ours.get(k), netlify.get(k)) for k in sorted(keys) if ours.get(k) != netlify.get(k)}


# ---- the differences kept (docs/reference.md lists them with the same reasons) ------------

NO_SUCH_SEARCH_URL = b'{"error":"no such search URL: ask /api/<model>/neuron2graph-search?query=any:the (the models are listed at /api)"}'


def _dev_retries_edge_404(ours: dict, netlify: dict) -> bool:
    """Netlify's dev server, given a 404 from the edge function, asks it again for the path plus
    .html, .htm, /index.html and /index.htm (its static pretty-URL lookup) and keeps the last
    answer, which the search function answers "no such search URL", or, where that retried path is
    not the search URL's, api-not-found answers with the API's JSON 404 (its Content-Type names the
    charset): the same status, still a JSON error. `serve` keeps the function's own message (what
    Deno answers for the URL)."""
    from sitegen.site.edge import NOT_FOUND_BODY

    return (
        differences(ours, netlify).keys() <= {"body", "content-type"}
        and ours["status"] == netlify["status"] == 404
        and netlify["body"] in (NO_SUCH_SEARCH_URL, NOT_FOUND_BODY)
        and ours["body"].startswith(b'{"error":')
    )


def _serve_refuses_non_integer(ours: dict, netlify: dict) -> bool:
    """`serve` answers 400 to a chooser value that is not a whole number (netlify.toml's
    convention); Netlify cannot check a placeholder and redirects, within the model's own path,
    to a page that does not exist."""
    return (
        ours["status"] == 400
        and ours["body"].endswith(b"must be a whole number\n")
        and netlify["status"] == 302
        and netlify["location"].startswith(f"/{MODEL}/")
    )


def _dev_forbids_nul(ours: dict, netlify: dict) -> bool:
    """Netlify's dev file server refuses a NUL in the path with its own 403 JSON; `serve` answers
    the site's 404 page (no file can have that name)."""
    return ours["status"] == 404 and netlify["status"] == 403 and b"FST_STATIC_FORBIDDEN_PATH" in netlify["body"]


KEPT = {
    SEARCH: _dev_retries_edge_404,
    "/api/nope-model/neuron2graph-search?query=any:the": _dev_retries_edge_404,
    f"/{MODEL}/go?layer=%2F%2Fevil.com&neuron=2": _serve_refuses_non_integer,
    f"/{MODEL}/go?layer=%5C%5Cevil.com&neuron=2": _serve_refuses_non_integer,
    f"/{MODEL}/go?layer=..%2F..%2F%2Fevil.com&neuron=0": _serve_refuses_non_integer,
    f"/{MODEL}/go?layer=-1&neuron=0": _serve_refuses_non_integer,
    f"/{MODEL}/go?layer=abc&neuron=0": _serve_refuses_non_integer,
    "/api/%00": _dev_forbids_nul,
}


@pytest.mark.parametrize("target", URLS)
def test_serve_answers_as_netlify_dev(served_site, netlify_dev, target):
    ours, netlify = answer(served_site, target), answer(netlify_dev, target)
    diff = differences(ours, netlify)
    if target in KEPT:
        assert diff, f"{target}: both servers now agree; drop it from KEPT (and from docs/reference.md's list)"
        assert KEPT[target](ours, netlify), (
            f"{target}: not the kept difference ({KEPT[target].__doc__.split('.')[0]}): {diff}"
        )
    else:
        assert not diff, f"{target}: (sitegen serve, netlify dev) differ: {diff}"


@pytest.mark.parametrize("target", API_NOT_FOUND)
def test_unknown_api_url_is_a_json_404_on_both_servers(served_site, netlify_dev, target):
    for base in (served_site, netlify_dev):
        got = answer(base, target)
        assert (got["status"], got["content-type"], got["access-control-allow-origin"]) == (
            404,
            "application/json; charset=utf-8",
            "*",
        ), base
        assert set(json.loads(got["body"])) == {"error"}
        from sitegen.site.edge import NOT_FOUND_BODY

        assert got["body"] == NOT_FOUND_BODY, base


@pytest.mark.parametrize("target", HEAD)
def test_head_answers_as_netlify_dev(served_site, netlify_dev, target):
    ours, netlify = answer(served_site, target, "HEAD"), answer(netlify_dev, target, "HEAD")
    assert ours["body"] == netlify["body"] == b""
    assert not differences(ours, netlify), (
        f"HEAD {target}: (sitegen serve, netlify dev) differ: {differences(ours, netlify)}"
    )


def off_site(base: str, target: str, location: str) -> bool:
    """Whether a browser following LOCATION from TARGET leaves BASE's host ('\\' reads as '/')."""
    resolved = urljoin(base + target.split("?")[0], location.replace("\\", "/"))
    return urlsplit(resolved).netloc != urlsplit(base).netloc


@pytest.mark.parametrize("target", HOSTILE + CHOOSER)
def test_no_path_redirects_off_site_on_either_server(served_site, netlify_dev, target):
    for base in (served_site, netlify_dev):
        got = answer(base, target)
        assert got["status"] != -1, f"{base}{target}: no answer"
        location = got.get("location")
        if location is not None:
            assert not off_site(base, target, location), f"{base}{target}: Location {location!r} leaves the site"
            assert location.startswith(f"/{MODEL}/") or location.startswith("/nope-model/"), (
                f"{base}{target}: Location {location!r}"
            )


def test_invalid_utf8_path_ends_netlify_dev_but_not_serve(served_site, netlify_dev):
    """The last test of the module: Netlify's CLI exits on this path (an uncaught "URIError: URI
    malformed" in its proxy), so it must run after every comparison. `serve` answers the site's
    404 page and goes on serving."""
    ours, netlify = answer(served_site, "/%ff%fe"), answer(netlify_dev, "/%ff%fe")
    assert ours["status"] == 404 and b"<html" in ours["body"].lower()
    assert netlify["status"] == -1
    assert answer(served_site, "/")["status"] == 200

"""The JSON API through `sitegen serve` (the same rules netlify.toml declares)."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest
import requests
import tomllib

MODEL = "toy-model"


def test_paper_client_snippet(served_site):
    base = served_site
    r = requests.get(base + f"/api/{MODEL}/neuroscope/1/2")
    tokens = r.json()["data"]["texts"][0]["tokens"]
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json; charset=utf-8"  # Netlify's
    assert tokens[3] == "<script>alert(1)</script>"


@pytest.mark.parametrize(
    "path",
    [
        "/api",
        "/api/index.json",
        f"/api/{MODEL}",
        f"/api/{MODEL}.json",
        f"/api/{MODEL}/neuroscope/0",
        f"/api/{MODEL}/neuroscope/0/3",
        f"/api/{MODEL}/neuroscope/0/3.json",
        f"/api/{MODEL}/all/1/0",
        f"/api/{MODEL}/logits/1/1",
        f"/api/{MODEL}/neuroscope",
    ],
)
def test_extensionless_and_json_urls_answer_with_cors(served_site, path):
    r = requests.get(served_site + path)
    assert r.status_code == 200, path
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert r.headers["Content-Type"] == "application/json; charset=utf-8"
    orjson.loads(r.content)


def test_same_bytes_with_and_without_suffix(served_site):
    a = requests.get(served_site + f"/api/{MODEL}/neuroscope/1/1").content
    b = requests.get(served_site + f"/api/{MODEL}/neuroscope/1/1.json").content
    assert a == b


@pytest.mark.parametrize(
    "path",
    [
        "/api/nope",
        "/api/nope/neuroscope/0/1",
        f"/api/{MODEL}/nope/0/1",
        f"/api/{MODEL}/neuroscope/9",
        f"/api/{MODEL}/neuroscope/0/99",
        f"/api/{MODEL}/neuroscope/0/99.json",
        f"/api/{MODEL}/all/9/9",
        f"/api/{MODEL}/neuron_explainer/0/0",
        f"/api/{MODEL}/neuron_explainer",
    ],
)
def test_unknown_api_url_is_a_json_404(served_site, path):
    """Unknown model, service, layer or neuron, and a service the model lacks (no stub files):
    404 with a JSON body and the API's CORS header, not the HTML page."""
    r = requests.get(served_site + path)
    assert r.status_code == 404, path
    assert (
        r.headers["Content-Type"] == "application/json; charset=utf-8"
        and r.headers["Access-Control-Allow-Origin"] == "*"
    )
    assert r.json()["error"].startswith("no such API URL")
    page = requests.get(served_site + "/no/such/page")  # outside /api: the site's HTML 404 page
    assert page.status_code == 404 and page.headers["Content-Type"] == "text/html; charset=utf-8"


def test_api_404_body_is_the_edge_functions():
    """netlify/edge-functions/api-not-found.ts answers Netlify's 404s under /api/ with the bytes of
    edge.NOT_FOUND_BODY (its JSON.stringify literal holds the same message), and netlify.toml
    declares it for /api/* after the search function, which answers its own errors."""
    from sitegen.site.edge import NOT_FOUND_BODY

    repo = Path(__file__).resolve().parents[1]
    source = (repo / "netlify" / "edge-functions" / "api-not-found.ts").read_text()
    assert f"error: {orjson.dumps(orjson.loads(NOT_FOUND_BODY)['error']).decode()}," in source
    declared = [
        (d["path"], d["function"]) for d in tomllib.loads((repo / "netlify.toml").read_text())["edge_functions"]
    ]
    assert declared[-1] == ("/api/*", "api-not-found") and declared.index(("/api/*", "api-not-found")) > 0


def test_headers_match_netlify_toml(served_site):
    doc = tomllib.loads((Path(__file__).resolve().parents[1] / "netlify.toml").read_text())
    site_headers = next(h["values"] for h in doc["headers"] if h["for"] == "/*")
    r = requests.get(served_site + f"/{MODEL}/0/0.html")
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    for name, value in site_headers.items():
        assert r.headers[name] == value
    assert "Access-Control-Allow-Origin" not in r.headers  # CORS only on /api
    css = requests.get(served_site + "/")
    href = css.text.split('rel="stylesheet" href="')[1].split('"')[0]
    r = requests.get(served_site + href)
    assert "immutable" in r.headers["Cache-Control"] and r.headers["Content-Type"].startswith("text/css")


def test_pretty_neuron_url_and_nojs_chooser(served_site):
    assert requests.get(served_site + f"/{MODEL}/1/2").text == requests.get(served_site + f"/{MODEL}/1/2.html").text
    r = requests.get(served_site + f"/{MODEL}/go?layer=1&neuron=3", allow_redirects=False)
    # the build's _redirects rule for this model; the query passes on, as on Netlify
    assert r.status_code == 302 and r.headers["Location"] == f"/{MODEL}/1/3.html?layer=1&neuron=3"
    r = requests.get(served_site + f"/{MODEL}/go?layer=1&neuron=3")
    assert r.status_code == 200 and r.url == served_site + f"/{MODEL}/1/3.html?layer=1&neuron=3"


def _spec(built_site) -> dict:
    from openapi_spec_validator import validate

    spec = orjson.loads((built_site / "api" / "openapi.json").read_bytes())
    validate(spec)
    return spec


def _template_regex(template: str) -> re.Pattern:
    """A documented path as the URLs it stands for: names one segment, layer and neuron digits."""
    out = re.sub(r"\\\{(layer|neuron)\\\}", "[0-9]+", re.escape(template))
    return re.compile("^" + re.sub(r"\\\{\w+\\\}", "[^/]+", out) + "$")


def _documented(spec: dict, url: str) -> str | None:
    """The path template URL answers: of those matching, the one with the most literal segments."""
    matches = [t for t in spec["paths"] if _template_regex(t).match(url)]
    return max(matches, key=lambda t: sum(not s.startswith("{") for s in t.split("/")), default=None)


def _validator(spec: dict, template: str, status: str = "200"):
    from jsonschema import Draft202012Validator

    schema = spec["paths"][template]["get"]["responses"][status]["content"]["application/json"]["schema"]
    return Draft202012Validator({**schema, "components": spec["components"]})


def test_every_built_api_file_answers_a_documented_path_and_conforms(built_site):
    """Every file the build writes under api/ is the answer of a path in /api/openapi.json and
    validates against that path's schema; every documented path of a service the model has is
    written (the search URL is an edge function's)."""
    spec = _spec(built_site)
    seen = set()
    files = sorted((built_site / "api").rglob("*.json"))
    assert len(files) > 40
    for f in files:
        rel = f.relative_to(built_site / "api").with_suffix("").as_posix()
        url = "/api" if rel == "index" else f"/api/{rel}"
        template = _documented(spec, url)
        assert template is not None, f"{f.relative_to(built_site)}: no documented path answers {url}"
        errors = list(_validator(spec, template).iter_errors(orjson.loads(f.read_bytes())))
        assert not errors, f"{url} ({template}): {errors[0].message} at {list(errors[0].absolute_path)}"
        seen.add(template)
    services = orjson.loads((built_site / "api" / f"{MODEL}.json").read_bytes())["metadata"]["available_services"]
    for template in spec["paths"]:
        parts = template.split("/")
        lacking = len(parts) > 3 and parts[3] not in services and parts[3] not in ("all",)
        if template not in seen and not lacking and not template.endswith("-search"):
            raise AssertionError(f"{template}: documented, but the build writes no file for it")
    assert "/api/{model}/neuron2graph/{layer}" in seen and "/api/{model}/all/{layer}" in seen


def test_search_and_404_answers_conform_to_openapi(built_site, served_site):
    spec = _spec(built_site)
    search = "/api/{model}/neuron2graph-search"
    for url in (
        f"{search.replace('{model}', MODEL)}?query=any:w3",
        f"{search.replace('{model}', MODEL)}?query=any:nothing",
    ):
        r = requests.get(served_site + url)
        assert r.status_code == 200 and not list(_validator(spec, search).iter_errors(r.json())), url
    for url in (
        "/api/nope/neuroscope/0/1",
        f"/api/{MODEL}/neuroscope/0/99",
        f"/api/{MODEL}/neuron_explainer/0/0",
        f"/api/{MODEL}/all/9",
    ):
        r = requests.get(served_site + url)
        template = _documented(spec, url)
        assert r.status_code == 404 and not list(_validator(spec, template, "404").iter_errors(r.json())), url


def _undescribed(node, where: str):
    """Every schema property, array item object and oneOf branch object under NODE lacking a description."""
    if isinstance(node, dict):
        for name, prop in (node.get("properties") or {}).items():
            if "description" not in prop:
                yield f"{where}.{name}"
            yield from _undescribed(prop, f"{where}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                yield from _undescribed(node[key], f"{where}[{key}]")
        for key in ("oneOf", "prefixItems"):
            for i, sub in enumerate(node.get(key) or ()):
                yield from _undescribed(sub, f"{where}.{key}[{i}]")


def test_every_openapi_path_parameter_and_property_is_described(built_site):
    spec = _spec(built_site)
    missing = []
    for name, schema in spec["components"]["schemas"].items():
        if "description" not in schema:
            missing.append(f"schema {name}")
        missing.extend(_undescribed(schema, name))
    for template, item in spec["paths"].items():
        op = item["get"]
        missing.extend(f"{template} {k}" for k in ("summary", "description") if not op.get(k))
        missing.extend(f"{template} parameter {p['name']}" for p in op["parameters"] if not p.get("description"))
        for status, response in op["responses"].items():
            schema = response.get("content", {}).get("application/json", {}).get("schema", {})
            missing.extend(_undescribed(schema, f"{template} {status}"))
    assert not missing, f"{len(missing)} without a description: {missing[:20]}"
    assert "/api/{model}/neuron2graph/{layer}" in spec["paths"]
    props = spec["components"]["schemas"]["Text"]["properties"]
    assert all(len(props[k]["description"]) > 20 for k in ("min_range", "max_range", "data_index"))


def test_neuroscope_documents_what_its_payload_carries(built_site):
    """The neuroscope answer's documented fields are the ones its payload has (no random texts)."""
    spec = _spec(built_site)
    documented = set(spec["components"]["schemas"]["Neuroscope"]["properties"])
    payload = orjson.loads((built_site / "api" / MODEL / "neuroscope" / "0" / "1.json").read_bytes())["data"]
    assert set(payload) == documented
    op = spec["paths"]["/api/{model}/neuroscope/{layer}/{neuron}"]["get"]
    assert "random" not in (op["summary"] + op["description"]).lower()


def test_rules_match_netlify_semantics(tmp_path):
    from sitegen.site.rules import REDIRECTS_FILE, chooser_redirects, site_rules

    (tmp_path / REDIRECTS_FILE).write_text(chooser_redirects(["m"]))
    rules = site_rules(tmp_path)
    files = {"/api/m/neuroscope/0/1.json", "/m/0/1.html", "/404.html", "/api/index.json", "/api.html"}
    exists = files.__contains__
    assert rules.decide("/api/m/neuroscope/0/1", "", exists).file == "/api/m/neuroscope/0/1.json"
    assert (
        rules.decide("/api/m/neuroscope/0/1.json", "", exists).file == "/api/m/neuroscope/0/1.json"
    )  # files shadow rules
    assert (
        rules.decide("/api", "", lambda p: exists(p) or p == "/api").file == "/api/index.json"
    )  # forced: api.html does not shadow it
    go = rules.decide("/m/go", "layer=0&neuron=1", exists)
    assert (go.status, go.location) == (302, "/m/0/1.html?layer=0&neuron=1")
    assert rules.decide("/other/go", "layer=0&neuron=1", exists).status == 404  # no rule names that model
    assert rules.decide("/m/go", "layer=0", exists).status == 404  # query condition not met
    assert rules.decide("/nothing/here", "", exists).status == 404


@pytest.mark.deno
def test_api_not_found_edge_function_under_deno(tmp_path):
    """The deployed function itself, under Deno with a stand-in for Netlify's context: a 404 from
    the rest of the chain becomes the JSON body with the 404's own headers (CORS kept, the HTML
    page's length and ETag dropped); any other answer passes through untouched."""
    import os
    import subprocess

    import deno

    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "check.ts"
    script.write_text(f"""
import handler, {{ BODY }} from "{(repo / "netlify" / "edge-functions" / "api-not-found.ts").as_uri()}";
const page = (status: number) => () => Promise.resolve(new Response("<html>page</html>", {{ status, headers: {{
  "Content-Type": "text/html; charset=utf-8", "Access-Control-Allow-Origin": "*", "ETag": "x", "Content-Length": "17" }} }}));
const missing = await handler(new Request("http://h/api/m/nope"), {{ next: page(404) }});
const head = await handler(new Request("http://h/api/m/nope", {{ method: "HEAD" }}), {{ next: page(404) }});
const found = await handler(new Request("http://h/api/m"), {{ next: page(200) }});
console.log(JSON.stringify({{
  missing: [missing.status, missing.headers.get("content-type"), missing.headers.get("access-control-allow-origin"),
            missing.headers.get("etag"), await missing.text()],
  head: [head.status, await head.text()], found: [found.status, found.headers.get("content-type"), await found.text()], body: BODY }}));
""")
    done = subprocess.run(
        [deno.find_deno_bin(), "run", "--quiet", "--no-prompt", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DENO_NO_UPDATE_CHECK": "1", "NO_COLOR": "1", "DENO_DIR": str(tmp_path / "deno")},
    )
    assert done.returncode == 0, done.stderr
    from sitegen.site.edge import NOT_FOUND_BODY

    got = orjson.loads(done.stdout)
    assert got["body"].encode() == NOT_FOUND_BODY
    assert got["missing"] == [404, "application/json; charset=utf-8", "*", None, NOT_FOUND_BODY.decode()]
    assert got["head"] == [404, ""]
    assert got["found"] == [200, "text/html; charset=utf-8", "<html>page</html>"]
    check = subprocess.run(
        [deno.find_deno_bin(), "check", "--quiet", str(repo / "netlify" / "edge-functions" / "api-not-found.ts")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DENO_NO_UPDATE_CHECK": "1", "NO_COLOR": "1", "DENO_DIR": str(tmp_path / "deno")},
    )
    assert check.returncode == 0, check.stderr + check.stdout

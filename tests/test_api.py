"""The JSON API through `sitegen serve` (the same rules netlify.toml declares)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import orjson
import pytest
import requests

MODEL = "toy-model"


def test_paper_client_snippet(served_site):
    base = served_site
    r = requests.get(base + f"/api/{MODEL}/neuroscope/1/2")
    tokens = r.json()["data"]["texts"][0]["tokens"]
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json; charset=utf-8"  # Netlify's
    assert tokens[3] == "<script>alert(1)</script>"


@pytest.mark.parametrize("path", ["/api", "/api/index.json", f"/api/{MODEL}", f"/api/{MODEL}.json", f"/api/{MODEL}/neuroscope/0",
                                  f"/api/{MODEL}/neuroscope/0/3", f"/api/{MODEL}/neuroscope/0/3.json", f"/api/{MODEL}/all/1/0",
                                  f"/api/{MODEL}/logits/1/1", f"/api/{MODEL}/neuroscope"])
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


@pytest.mark.parametrize("path", ["/api/nope", "/api/nope/neuroscope/0/1", f"/api/{MODEL}/nope/0/1", f"/api/{MODEL}/neuroscope/9",
                                  f"/api/{MODEL}/neuroscope/0/99", f"/api/{MODEL}/neuroscope/0/99.json", f"/api/{MODEL}/all/9/9",
                                  f"/api/{MODEL}/neuron_explainer/0/0", f"/api/{MODEL}/neuron_explainer"])
def test_unknown_api_url_is_a_json_404(served_site, path):
    """Unknown model, service, layer or neuron, and a service the model lacks (no stub files):
    404 with a JSON body and the API's CORS header, not the HTML page."""
    r = requests.get(served_site + path)
    assert r.status_code == 404, path
    assert r.headers["Content-Type"] == "application/json; charset=utf-8" and r.headers["Access-Control-Allow-Origin"] == "*"
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
    assert f'error: {orjson.dumps(orjson.loads(NOT_FOUND_BODY)["error"]).decode()},' in source
    declared = [(d["path"], d["function"]) for d in tomllib.loads((repo / "netlify.toml").read_text())["edge_functions"]]
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


def test_built_api_conforms_to_openapi(built_site, served_site):
    from jsonschema import Draft202012Validator
    from openapi_spec_validator import validate

    spec = orjson.loads((built_site / "api" / "openapi.json").read_bytes())
    validate(spec)
    schemas = spec["components"]["schemas"]

    def validator(path: str) -> Draft202012Validator:
        schema = spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        return Draft202012Validator({**schema, "components": {"schemas": schemas}})

    checks = {
        "/api": ["/api"],
        "/api/{model}": [f"/api/{MODEL}"],
        "/api/{model}/neuroscope/{layer}/{neuron}": [f"/api/{MODEL}/neuroscope/{l}/{n}" for l in range(2) for n in range(4)],
        "/api/{model}/logits/{layer}/{neuron}": [f"/api/{MODEL}/logits/{l}/{n}" for l in range(2) for n in range(4)],
        "/api/{model}/neuroscope/{layer}": [f"/api/{MODEL}/neuroscope/{l}" for l in range(2)],
        "/api/{model}/neuron2graph/{layer}/{neuron}": [f"/api/{MODEL}/neuron2graph/{l}/{n}" for l in range(2) for n in range(4)],
        "/api/{model}/neuron_explainer/{layer}/{neuron}": [f"/api/{MODEL}/neuron_explainer/0/0"],  # the missing envelope
        "/api/{model}/neuron2graph-search": [f"/api/{MODEL}/neuron2graph-search?query=any:w3", f"/api/{MODEL}/neuron2graph-search?query=any:nothing"],
        "/api/{model}/all/{layer}/{neuron}": [f"/api/{MODEL}/all/0/0"],
    }
    for template, urls in checks.items():
        v = validator(template)
        for url in urls:
            errors = list(v.iter_errors(requests.get(served_site + url).json()))
            assert not errors, f"{url}: {errors[0].message}"


def test_rules_match_netlify_semantics(tmp_path):
    from sitegen.site.rules import REDIRECTS_FILE, chooser_redirects, site_rules

    (tmp_path / REDIRECTS_FILE).write_text(chooser_redirects(["m"]))
    rules = site_rules(tmp_path)
    files = {"/api/m/neuroscope/0/1.json", "/m/0/1.html", "/404.html", "/api/index.json", "/api.html"}
    exists = files.__contains__
    assert rules.decide("/api/m/neuroscope/0/1", "", exists).file == "/api/m/neuroscope/0/1.json"
    assert rules.decide("/api/m/neuroscope/0/1.json", "", exists).file == "/api/m/neuroscope/0/1.json"  # files shadow rules
    assert rules.decide("/api", "", lambda p: exists(p) or p == "/api").file == "/api/index.json"  # forced: api.html does not shadow it
    go = rules.decide("/m/go", "layer=0&neuron=1", exists)
    assert (go.status, go.location) == (302, "/m/0/1.html?layer=0&neuron=1")
    assert rules.decide("/other/go", "layer=0&neuron=1", exists).status == 404  # no rule names that model
    assert rules.decide("/m/go", "layer=0", exists).status == 404  # query condition not met
    assert rules.decide("/nothing/here", "", exists).status == 404

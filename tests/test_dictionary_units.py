"""Dictionary latents as units (`compute --sae`): the stored activations are the dictionary's
encoder applied at its hook (each architecture, and a transcoder), the quality figures are the
direct computation, shards merge byte for byte, `verify` checks latents, and the build publishes
them beside the neurons with links both ways, at API paths that conform to the OpenAPI file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pytest
from click.testing import CliRunner

from sitegen.cli import main
from tests.test_dictionaries import numpy_encode

pytestmark = pytest.mark.model

SEQ_LEN, TOKENS = 16, 2400
DICTIONARIES = {  # name -> random_dictionary arguments (the tiny model: d_model 32, d_mlp 48, 3 layers)
    "res1": dict(architecture="topk", d_in=32, d_sae=64, hook_name="blocks.1.hook_resid_post", k=6),
    "mlp2": dict(architecture="jumprelu", d_in=48, d_sae=40, hook_name="blocks.2.mlp.hook_post"),
    "std0": dict(architecture="standard", d_in=32, d_sae=24, hook_name="blocks.0.hook_resid_mid"),
    "tc1": dict(
        architecture="standard",
        d_in=32,
        d_sae=30,
        hook_name="blocks.1.ln2.hook_normalized",
        hook_out="blocks.1.hook_mlp_out",
        d_out=32,
        skip=True,
    ),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    from sitegen.dictionaries.format import random_dictionary, save_dictionary

    root = tmp_path_factory.mktemp("dictionaries")
    out = {}
    for i, (name, kw) in enumerate(DICTIONARIES.items()):
        kw = dict(kw)
        args = (kw.pop("architecture"), kw.pop("d_in"), kw.pop("d_sae"), kw.pop("hook_name"))
        save_dictionary(random_dictionary(*args, seed=i, name=name, **kw), root / name)
        out[name] = root / name
    return out


def _config(model_dir, corpus, out, folders, **kw):
    from sitegen.compute.runner import ComputeConfig

    return ComputeConfig(
        model=str(model_dir),
        corpus=str(corpus),
        out=out,
        tokens=TOKENS,
        seq_len=SEQ_LEN,
        progress=False,
        dictionaries=tuple(str(folders[n]) for n in DICTIONARIES),
        **kw,
    )


@pytest.fixture(scope="module")
def store(tiny_model_dir, tiny_corpus, folders, tmp_path_factory) -> Path:
    from sitegen.compute.runner import run_compute

    out = tmp_path_factory.mktemp("with-dictionaries") / "store"
    run_compute(_config(tiny_model_dir, tiny_corpus, out, folders), log=lambda m: None)
    return out


def _hooked(model, token_rows: list[np.ndarray], hook: str) -> list[np.ndarray]:
    """The activation at HOOK of each sequence run alone (float64 numpy, [positions, width])."""
    got = []
    for ids in token_rows:
        captured = []
        model.run_hooks(np.asarray(ids, dtype=np.int64)[None], [(hook, lambda a: captured.append(a))])
        got.append(captured[0][0].double().cpu().numpy())
    return got


def test_latents_equal_a_direct_numpy_encode_and_quality_is_direct(store, folders, tiny_model_dir):
    """For every architecture (and the transcoder): each latent's stored top traces are a numpy
    encode of the hooked activations; its stored maximum is the maximum over every counted token;
    L0, FVU and the dead count equal the direct computation over the counted tokens."""
    from sitegen.compute.models import load_model
    from sitegen.store import Store

    base = Store.open(store)
    assert base.manifest["dictionaries"] == list(DICTIONARIES)
    model = load_model(str(tiny_model_dir))
    for name, kw in DICTIONARIES.items():
        sub = Store.open(store / "dictionaries" / name)
        m = sub.manifest
        assert m["model"]["name"] == f"{base.manifest['model']['name']}.{name}"
        assert (m["model"]["num_layers"], m["model"]["layer_size"]) == (1, kw["d_sae"])
        sub_seqs = sub.sequences()
        ids = dict(zip(sub_seqs.column("seq_id").to_pylist(), sub_seqs.column("token_ids").to_pylist()))
        order = sorted(ids)
        x = _hooked(model, [ids[s] for s in order], kw["hook_name"])
        z = {s: numpy_encode(folders[name], xs)[0] for s, xs in zip(order, x)}
        t = sub.read_layer("neuroscope", 0).to_pydict()
        checked = 0
        for latent in range(kw["d_sae"]):
            for seq, trace in zip(t["top_seq"][latent], t["top_acts"][latent]):
                direct = z[seq][: len(trace), latent]
                assert np.allclose(trace, direct, rtol=1e-4, atol=1e-4), (name, latent, seq)
                checked += 1
        assert checked > kw["d_sae"]
        # Quality over every counted token of the pass (BOS excluded), straight from the activations.
        from sitegen.compute.packing import pack_sequences
        from sitegen.corpus import load_corpus

        corpus = load_corpus(m["corpus"]["source"])
        packed = list(pack_sequences(corpus, model.tokenizer, SEQ_LEN, TOKENS, 0))
        rows = [s.token_ids for s in packed]
        xs = _hooked(model, rows, kw["hook_name"])
        target = _hooked(model, rows, kw["hook_out"]) if kw.get("hook_out") else xs
        zs, recon = zip(*(numpy_encode(folders[name], xi) for xi in xs))
        if kw.get("hook_out"):  # a transcoder's reconstruction of its output hook
            recon = [numpy_encode(folders[name], xi)[1] for xi in xs]
        Z = np.concatenate([zi[1:] for zi in zs])
        T = np.concatenate([ti[1:] for ti in target])
        R = np.concatenate([ri[1:] for ri in recon])
        q = m["dictionary"]["quality"]
        assert q["tokens"] == len(Z)
        assert q["l0"] == pytest.approx((Z != 0).sum(1).mean(), rel=1e-9)
        fvu = ((T - R) ** 2).sum(1).mean() / ((T - T.mean(0)) ** 2).sum(1).mean()
        assert q["fvu"] == pytest.approx(fvu, rel=1e-4)
        assert q["dead"] == int(((Z != 0).sum(0) == 0).sum())
        assert 0 < q["loss_tokens"] < q["tokens"] and q["loss_increase"] is not None
        top_max = np.array([row[0] for row in t["top_max"]])
        assert np.allclose(top_max, Z.max(0), rtol=1e-4, atol=1e-4)


def test_two_shards_merge_to_the_one_run_byte_for_byte(store, tiny_model_dir, tiny_corpus, folders, tmp_path):
    from sitegen.compute.runner import run_compute
    from sitegen.merge import merge_stores

    parts = []
    for i in range(2):
        part = tmp_path / f"shard{i}"
        run_compute(_config(tiny_model_dir, tiny_corpus, part, folders, shard=(i, 2)), log=lambda m: None)
        parts.append(part)
    merged = merge_stores(parts[::-1], tmp_path / "merged")
    one = sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file() and not p.name.startswith("."))
    two = sorted(p.relative_to(merged) for p in merged.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert one == two and any(p.parts[0] == "dictionaries" for p in one)
    for rel in one:
        a, b = (store / rel).read_bytes(), (merged / rel).read_bytes()
        if rel.name == "manifest.json":  # the stamps of the writing runs aside, the same manifest
            a, b = (orjson.loads(x) for x in (a, b))
            for x in (a, b):
                x.pop("sitegen_version")
            assert a == b, rel
        else:
            assert a == b, rel


def test_verify_checks_latents_and_names_a_perturbed_one(store, tmp_path):
    from sitegen.store import Store

    sub = store / "dictionaries" / "res1"
    ok = CliRunner().invoke(main, ["verify", str(sub), "--neurons", "all"])
    assert ok.exit_code == 0, ok.output
    broken = tmp_path / "broken"
    shutil.copytree(sub, broken)
    st = Store.open(broken)
    t = st.read_layer("neuroscope", 0)
    acts = t.column("top_acts").to_pylist()
    latent = max(range(len(acts)), key=lambda j: max(max(tr) for tr in acts[j]))
    acts[latent] = [[a * 1.01 for a in trace] for trace in acts[latent]]
    col = t.schema.get_field_index("top_acts")
    st.write_layer("neuroscope", 0, t.set_column(col, "top_acts", pa.array(acts, t.schema.field("top_acts").type)))
    bad = CliRunner().invoke(main, ["verify", str(broken), "--neurons", "all"])
    assert bad.exit_code == 1, bad.output
    fails = [line.strip() for line in bad.output.splitlines() if "FAIL layer" in line]
    assert fails and all(line.startswith(f"FAIL layer 0 neuron {latent}:") for line in fails), bad.output


def test_build_publishes_latents_with_links_both_ways(store, tmp_path):
    from sitegen.site.build import build_site
    from tests.test_api import _documented, _spec, _validator

    site = tmp_path / "site"
    build_site([store], site, log=lambda m: None)
    model = orjson.loads((store / "manifest.json").read_bytes())["model"]["name"]
    res1 = f"{model}.res1"
    meta = orjson.loads((site / "api" / f"{res1}.json").read_bytes())["metadata"]
    assert meta["num_layers"] == 1 and meta["layer_size"] == 64
    assert "dictionary" in meta["available_services"] and "neuroscope" in meta["available_services"]
    spec = _spec(site)
    for f in sorted((site / "api" / res1).rglob("*.json"))[:400] + sorted(
        (site / "api" / model / "dictionary").rglob("*.json")
    ):
        url = "/api/" + f.relative_to(site / "api").with_suffix("").as_posix()
        template = _documented(spec, url)
        assert template is not None, url
        errors = list(_validator(spec, template).iter_errors(orjson.loads(f.read_bytes())))
        assert not errors, f"{url}: {errors[0].message}"
    # A latent links to the neurons it reads from / writes to, and back.
    latent = orjson.loads((site / "api" / res1 / "dictionary" / "0" / "5.json").read_bytes())["data"]
    assert latent["base_model"] == model and len(latent["similar"]) == 10 and len(latent["reads"]) == 10
    assert all(e["layer"] == 1 for e in latent["reads"] + latent["writes"])
    n = latent["writes"][0]["neuron"]
    page = (site / res1 / "0" / "5.html").read_text()
    assert f'href="/{model}/1/{n}.html"' in page
    neuron = orjson.loads((site / "api" / model / "dictionary" / "1" / f"{n}.json").read_bytes())["data"]
    assert {e["model"] for e in neuron["reads"] + neuron["writes"]} <= {res1, f"{model}.tc1"}
    assert (
        f'href="/{neuron["writes"][0]["model"]}/0/{neuron["writes"][0]["latent"]}.html"'
        in (site / model / "1" / f"{n}.html").read_text()
    )
    # The dictionary's model page carries its quality figures; its provenance names the dictionary
    # (sha256, hook) and shows a local folder as its last component only.
    assert (
        "FVU" in (site / res1 / "index.html").read_text()
        and "Latents per layer" in (site / res1 / "index.html").read_text()
    )
    assert "› Latent 5</nav>" in page and "› Neuron" in (site / model / "1" / "0.html").read_text()
    record = orjson.loads((store / "dictionaries" / "res1" / "manifest.json").read_bytes())["dictionary"]
    prov = orjson.loads((site / "api" / res1 / "neuroscope" / "0" / "5.json").read_bytes())["metadata"]["provenance"]
    assert prov["dictionary"]["sha256"] == record["sha256"] and prov["dictionary"]["source"] == "res1"
    assert record["source"].endswith("/res1") and record["source"] not in page
    assert record["sha256"] in page and "blocks.1.hook_resid_post" in page


def test_a_dictionary_that_does_not_fit_is_one_line(tiny_model_dir, tiny_corpus, folders, tmp_path):
    from sitegen.dictionaries.format import random_dictionary, save_dictionary

    wrong = tmp_path / "wide"
    save_dictionary(random_dictionary("standard", 40, 16, "blocks.1.hook_resid_post", name="wide"), wrong)
    args = ["compute", "--model", str(tiny_model_dir), "--corpus", str(tiny_corpus), "--out", str(tmp_path / "s")]
    result = CliRunner().invoke(main, [*args, "--tokens", "500", "--quiet", "--sae", str(wrong)])
    assert result.exit_code != 0
    line = result.output.strip()
    assert "\n" not in line and "d_in" in line and "cfg.json" in line, result.output
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_the_fifth_service_runs_on_latents(monkeypatch, tmp_path, tiny_model_dir, tiny_corpus, folders):
    """A plugin service's accumulator sees the latents as it sees neurons: the test plugin's
    per-unit density on a dictionary's store equals the dictionary's own active counts (kept by
    the runner's quality sums, a separate computation), and its panel is on the latent's page."""
    from sitegen.services import registry
    from sitegen.site.build import build_site
    from sitegen.store import Store
    from tests.test_service_contract import _install_entry_points

    _install_entry_points(monkeypatch, tmp_path / "site-packages", "sparsity = sitegen_sparsity:Sparsity")
    try:
        from sitegen.compute.runner import ComputeConfig, run_compute

        out = tmp_path / "store"
        cfg = ComputeConfig(
            model=str(tiny_model_dir),
            corpus=str(tiny_corpus),
            out=out,
            tokens=800,
            seq_len=SEQ_LEN,
            progress=False,
            dictionaries=(str(folders["res1"]),),
        )
        run_compute(cfg, log=lambda m: None)
        sub = Store.open(out / "dictionaries" / "res1")
        assert "sparsity" in sub.manifest["services"]
        t = sub.read_layer("sparsity", 0).to_pydict()
        sums = sub.manifest["dictionary"]["sums"]
        assert t["positive"] == sums["latent_active"] and set(t["tokens"]) == {sums["tokens"]}
        site = tmp_path / "site"
        build_site([out], site, log=lambda m: None)
        name = sub.manifest["model"]["name"]
        doc = orjson.loads((site / f"api/{name}/sparsity/0/3.json").read_bytes())["data"]
        assert doc["density"] == round(t["positive"][3] / t["tokens"][3], 6)
        assert f"Active on <strong>{100 * doc['density']:.1f}%</strong>" in (site / name / "0" / "3.html").read_text()
    finally:
        registry.cache_clear()


def test_explain_runs_on_latents_and_the_latent_page_shows_it(store, tmp_path):
    """`sitegen explain` on a dictionary's store explains and scores latents like neurons (a stub
    OpenAI-compatible server answers), and the built latent page carries the explanation."""
    from sitegen.services.neuron_explainer.explain import ExplainConfig, run_explain
    from sitegen.site.build import build_site
    from sitegen.store import Store
    from tests.test_explain import Stub

    sub = tmp_path / "latents"
    shutil.copytree(store / "dictionaries" / "res1", sub)
    stub = Stub("ok")
    try:
        cfg = ExplainConfig(store=sub, endpoint=stub.url, model="stub-model", neurons="0:3", timeout=5, retries=3)
        assert run_explain(cfg, log=lambda m: None) == {"done": 1, "failed": 0}
    finally:
        stub.close()
    row = Store.open(sub).read_layer("neuron_explainer", 0).to_pylist()[0]
    assert row["neuron"] == 3 and row["explanation"] == 'the word "tax".' and row["explainer"] == "stub-model"
    site = tmp_path / "site"
    build_site([sub], site, log=lambda m: None)
    name = Store.open(sub).manifest["model"]["name"]
    data = orjson.loads((site / "api" / name / "neuron_explainer" / "0" / "3.json").read_bytes())["data"]
    assert (
        data["explanation"] == row["explanation"] and data["score"] == row["score"] and "simulation" in data["scores"]
    )
    assert "the word &#34;tax&#34;." in (site / name / "0" / "3.html").read_text()

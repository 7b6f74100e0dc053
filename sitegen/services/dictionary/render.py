"""The dictionary service's render half: a latent's similar latents and neurons, a neuron's latents."""

from __future__ import annotations

from markupsafe import Markup, escape

from sitegen.services.dictionary.data import TABLE_SCHEMA


class DictionaryLayer:
    """For a dictionary's store (manifest `dictionary`): per latent, `similar` latents (decoder
    cosine) and the base model's neurons it `reads` from and `writes` along. For a model's store
    (manifest `dictionaries`): per neuron, the latents that read from and write along it."""

    def __init__(self, store, layer: int, site):
        m = store.manifest
        self.layer = layer
        self.record = m.get("dictionary")
        self.model = site.name
        if self.record is not None:  # a dictionary's latents link to the base model's neurons
            self.base, self.base_layer = self.record["base_model"], self.record["layer"]
        else:  # a model's neurons link to the latents of its dictionaries
            self.names = [f"{site.name}.{name}" for name in m.get("dictionaries", [])]
        self.cols: dict = {}
        if store.has_service("dictionary") and store.layer_path("dictionary", layer).exists():
            t = store.read_layer("dictionary", layer, columns=[f.name for f in TABLE_SCHEMA])
            self.cols = {name: t.column(name).to_pylist() for name in t.column_names}

    def payload(self, n: int) -> dict:
        out: dict = {"neuron_index": {"layer": self.layer, "neuron": n}}
        c = self.cols
        if self.record is not None:
            out["base_model"] = self.base
            out["similar"] = [
                {"latent": j, "cosine": round(v, 4)} for j, v in zip(c["similar"][n], c["similar_cos"][n])
            ]
            for side in ("reads", "writes"):
                out[side] = [
                    {"layer": self.base_layer, "neuron": j, "cosine": round(v, 4)}
                    for j, v in zip(c[side][n], c[f"{side}_cos"][n])
                ]
            return out
        for side in ("reads", "writes"):
            out[side] = (
                [
                    {"model": self.names[k], "latent": j, "cosine": round(v, 4)}
                    for k, j, v in zip(c[f"{side}_dict"][n], c[side][n], c[f"{side}_cos"][n])
                ]
                if c
                else []
            )
        return out

    def page(self, n: int) -> dict:
        """Link lists pre-rendered (names escaped here): a name is a model's, which the build checked."""
        p = self.payload(n)
        if self.record is not None:
            link = lambda e: (
                f'<li><a href="/{escape(self.model)}/0/{e["latent"]}.html">{e["latent"]}</a> <small>{e["cosine"]:.2f}</small></li>'
            )
            nlink = lambda e: (
                f'<li><a href="/{escape(self.base)}/{e["layer"]}/{e["neuron"]}.html">{e["layer"]}:{e["neuron"]}</a> '
                f"<small>{e['cosine']:.2f}</small></li>"
            )
            return {
                "latent": True,
                "base": self.base,
                "similar": Markup("".join(link(e) for e in p["similar"])),
                "reads": Markup("".join(nlink(e) for e in p["reads"])),
                "writes": Markup("".join(nlink(e) for e in p["writes"])),
            }
        llink = lambda e: (
            f'<li><a href="/{escape(e["model"])}/0/{e["latent"]}.html">{escape(e["model"])} {e["latent"]}</a> '
            f"<small>{e['cosine']:.2f}</small></li>"
        )
        return {
            "latent": False,
            "reads": Markup("".join(llink(e) for e in p["reads"])),
            "writes": Markup("".join(llink(e) for e in p["writes"])),
        }

    def layer_payload(self) -> dict:
        return {"num_neurons": len(self.cols.get("neuron", []))}

"""The registry of per-neuron services. A service is one folder here: a compute half (torch,
imported only by `sitegen compute`) and a render half (no torch) that the build calls, plus a
template partial themes/default/templates/services/<name>.html.

The build asks each registered service, per layer, for a LayerView: it reads the service's
Parquet table for that layer once and answers per neuron with the API payload (DeepDecipher's
shape) and the page context for the partial.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from sitegen.services.logits.render import LogitsLayer
from sitegen.services.neuron2graph.render import Neuron2GraphLayer
from sitegen.services.neuron_explainer.render import ExplainerLayer
from sitegen.services.neuroscope.render import NeuroscopeLayer


class LayerView(Protocol):
    def payload(self, neuron: int) -> dict: ...
    def page(self, neuron: int) -> dict: ...
    def layer_payload(self) -> dict: ...


@dataclass(frozen=True)
class Service:
    name: str  # URL segment and store folder
    title: str
    description: str
    open_layer: Callable[..., LayerView]  # (store, layer, site_context) -> LayerView
    needs: tuple[str, ...] = ()  # store services it renders from; default: its own name

    def available(self, store) -> bool:
        return any(store.has_service(name) for name in (self.needs or (self.name,)))


SERVICES: tuple[Service, ...] = (
    Service("neuron_explainer", "Explanation", "A one-sentence explanation written by a language model, with its simulation score.", ExplainerLayer),
    Service("neuroscope", "Max-activating examples", "Top, bottom and random sequences with per-token activations; activation statistics.", NeuroscopeLayer),
    # Every neuron gets token sets and similar neurons (from its graph, else from its top
    # sequences), so the service is there whenever neuroscope data is; graphs where computed.
    Service("neuron2graph", "Neuron2Graph", "A graph of the token patterns that make the neuron fire, with held-out precision/recall; "
            "its activating and important tokens; similar neurons.", Neuron2GraphLayer, needs=("neuroscope", "neuron2graph")),
    Service("logits", "Weight-based logit effects", "Tokens the neuron's output promotes and suppresses (W_out . W_U) and the input tokens that drive it (W_E . W_in).", LogitsLayer),
)

BY_NAME = {s.name: s for s in SERVICES}

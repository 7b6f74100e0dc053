"""The registry of per-neuron services. A service is one folder: a `Service` subclass (the
contract, sitegen/services/base.py) in its `service.py`, a compute half (torch, imported only
inside compute hooks), a render half (no torch) and its template partials in `templates/`
(`services/<name>.html`, `provenance/<name>.html`; a theme overrides any of them by name).

Services are found through the `sitegen.services` entry-point group, built-ins exactly as an
outside package's (pyproject.toml declares them): `name = "module:Class"`. Two services of one
name are refused, so a plugin cannot silently replace another.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from importlib import metadata

from sitegen.errors import ConfigError
from sitegen.services.base import LayerView, Service
from sitegen.store.manifest import ServiceSpec, set_service_specs

__all__ = ["GROUP", "LayerView", "Service", "by_name", "registry", "service_specs"]

GROUP = "sitegen.services"

# The built-ins, in the order the site shows them: the one list the registry reads, so they are
# there whatever metadata the install has (none, or an editable install's from another checkout).
# pyproject.toml's [project.entry-points."sitegen.services"] declares the same (a test checks
# they agree, and that the import-linter contracts name exactly these).
BUILTIN = {
    "neuron_explainer": "sitegen.services.neuron_explainer.service:NeuronExplainer",
    "neuroscope": "sitegen.services.neuroscope.service:Neuroscope",
    "neuron2graph": "sitegen.services.neuron2graph.service:Neuron2Graph",
    "logits": "sitegen.services.logits.service:Logits",
    "dictionary": "sitegen.services.dictionary.service:Dictionary",
    "correlation": "sitegen.services.correlation.service:Correlation",
}


# /api/<model>/all/<layer>/<neuron> holds one key per service beside these
RESERVED_NAMES = frozenset({"all", "metadata"})


def _load(entry_name: str, target: str) -> Service:
    module, _, attr = target.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(
            f"service entry point {entry_name} = {target!r} (group {GROUP}): cannot load it: {e}"
        ) from None
    service = obj() if isinstance(obj, type) else obj
    if not isinstance(service, Service):
        raise ConfigError(
            f"service entry point {entry_name} = {target!r}: not a sitegen.services.base.Service subclass or instance"
        )
    if service.name != entry_name:
        raise ConfigError(
            f"service entry point {entry_name} = {target!r}: the service calls itself {service.name!r}; use one name"
        )
    if service.name in RESERVED_NAMES:
        raise ConfigError(
            f"service entry point {entry_name} = {target!r}: {service.name!r} is a key of the API's `all` object; rename the service"
        )
    return service


@lru_cache(maxsize=1)
def registry() -> tuple[Service, ...]:
    """Every registered service: built-ins in their fixed order, then the others by name (so
    builds are deterministic whatever order the metadata lists them in)."""
    declared = dict(BUILTIN)
    for ep in metadata.entry_points(group=GROUP):
        if declared.get(ep.name, ep.value) != ep.value:
            if ep.name in BUILTIN:
                raise ConfigError(
                    f"service {ep.name!r} is built in; a package declares it again as {ep.value}: rename that service"
                )
            raise ConfigError(
                f"two services are named {ep.name!r} ({declared[ep.name]} and {ep.value}); "
                "uninstall one of the packages declaring them"
            )
        declared[ep.name] = ep.value
    order = [*BUILTIN, *sorted(n for n in declared if n not in BUILTIN)]
    return tuple(_load(name, declared[name]) for name in order)


def by_name() -> dict[str, Service]:
    return {s.name: s for s in registry()}


def service_specs() -> dict[str, ServiceSpec]:
    """What each registered service's part of a store must hold, as Store.open checks it."""
    return {
        s.name: ServiceSpec(
            schema=s.table_schema,
            complete=s.complete_layers,
            required=s.always_stored,
            token_columns=tuple(s.store_token_columns),
            records=tuple(sorted(s.manifest_schemas().items())),
        )
        for s in registry()
    }


set_service_specs(service_specs)  # the store may not import the services: they tell it

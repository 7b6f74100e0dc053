"""The explainer's commands, `sitegen explain` and `sitegen import-explanations`, added to the
CLI through `Service.cli_commands` (sitegen's cli.py does not name them)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option(
    "--endpoint",
    default=None,
    help="Base URL of an OpenAI-compatible API, e.g. https://api.openai.com/v1 or http://127.0.0.1:8080/v1 (or --local).",
)
@click.option("--model", default=None, help="The model name the endpoint serves (the explainer, simulator and judge).")
@click.option(
    "--local",
    is_flag=True,
    help="Explain and score in-process through transformers with the store's own model (no server).",
)
@click.option(
    "--local-model",
    default=None,
    help="Explain and score in-process with another model: a Hugging Face checkpoint folder or a .gguf file.",
)
@click.option(
    "--api-key-env",
    default=None,
    help="Environment variable holding the API key (never written anywhere) [default: OPENAI_API_KEY for https://api.openai.com only; "
    "other endpoints get no key unless a variable is named].",
)
@click.option(
    "--allow-insecure-http",
    is_flag=True,
    help="Allow sending the API key over plain http to a host other than loopback.",
)
@click.option(
    "--neurons",
    default="5",
    show_default=True,
    help="Which neurons: 3:17,5:2, or as --n2g: all, layers:0,5, N (most active per layer), N@0,5.",
)
@click.option(
    "--samples",
    type=int,
    default=1,
    show_default=True,
    help="Explanations sampled per neuron (temperature 1); the best on the valid split is kept and its test-split score reported.",
)
@click.option(
    "--contrastive",
    is_flag=True,
    help="Show the explainer hard negatives too: quiet excerpts sharing the words where the neuron fires (recorded per neuron).",
)
@click.option(
    "--scorers",
    default="simulation,detection,fuzzing",
    show_default=True,
    help="Scorers of each explanation, comma-separated: simulation (always) and any of detection, fuzzing (delphi's, on "
    "held-out excerpts); every score gets a 95% bootstrap interval.",
)
@click.option(
    "--scorer-excerpts",
    type=int,
    default=10,
    show_default=True,
    help="Held-out activating and as many non-activating excerpts (at most) that detection and fuzzing each judge.",
)
@click.option("--concurrency", type=int, default=4, show_default=True, help="Requests in flight at once.")
@click.option(
    "--timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds one request may take in all (connect to last byte), each try; above 0, at most a day.",
)
@click.option(
    "--max-response-mb",
    type=float,
    default=8.0,
    show_default=True,
    help="The largest answer read, in MB; a larger one fails its neuron (asked again on the next run).",
)
@click.option(
    "--retries",
    type=int,
    default=4,
    show_default=True,
    help="Retries (with backoff) on 429, 5xx, timeouts and dropped connections.",
)
@click.option(
    "--dry-run", is_flag=True, help="Print the first explanation prompt and the number of requests; send nothing."
)
def explain(
    store,
    endpoint,
    model,
    local,
    local_model,
    api_key_env,
    allow_insecure_http,
    neurons,
    samples,
    contrastive,
    scorers,
    scorer_excerpts,
    concurrency,
    timeout,
    max_response_mb,
    retries,
    dry_run,
):
    """Write and score explanations of neurons with an OpenAI-compatible model (resumable)."""
    from sitegen.services.neuron_explainer.explain import ExplainConfig, run_explain

    cfg = ExplainConfig(
        store=store,
        endpoint=endpoint,
        model=model,
        local=local,
        local_model=local_model,
        api_key_env=api_key_env,
        neurons=neurons,
        samples=samples,
        contrastive=contrastive,
        scorers=tuple(x.strip() for x in scorers.split(",") if x.strip()),
        scorer_excerpts=scorer_excerpts,
        concurrency=concurrency,
        timeout=timeout,
        max_response_mb=max_response_mb,
        retries=retries,
        allow_insecure_http=allow_insecure_http,
        dry_run=dry_run,
    )
    run_explain(cfg, log=lambda m: click.echo(m, err=not dry_run))


@click.command("import-explanations")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option(
    "--store",
    "store_root",
    type=click.Path(path_type=Path),
    required=True,
    help="The store of the model the explanations were written for.",
)
def import_explanations_cmd(folder, store_root):
    """Import OpenAI's published per-neuron explanation files (.json/.jsonl under FOLDER) into a store."""
    from sitegen.services.neuron_explainer.published import import_explanations

    import_explanations(folder, store_root, log=lambda m: click.echo(m, err=True))

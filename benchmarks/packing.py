"""Packing a hostile document: one 10 MB line without whitespace, packed up to a token budget.

    python benchmarks/packing.py [--tokenizer DIR] [--mb 10] [--tokens 20000]

Prints the time and the peak resident memory the packing adds. Documents are tokenised window by
window (sitegen/compute/packing.py), so both follow the budget, not the document's size.
The tokenizer defaults to SmolLM2's (the embedded default model, converted once into the cache).
"""

from __future__ import annotations

import argparse
import resource
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", help="a Hugging Face checkpoint folder [default: the embedded SmolLM2]")
    ap.add_argument("--mb", type=float, default=10.0)
    ap.add_argument("--tokens", type=int, default=20_000)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from sitegen.compute.models import _sha256_file, convert_gguf, default_gguf_path
    from sitegen.compute.packing import pack_sequences
    from sitegen.corpus import Corpus, Document

    folder = args.tokenizer
    if folder is None:
        gguf = default_gguf_path()
        folder = convert_gguf(gguf, _sha256_file(gguf).hexdigest())
    tok = AutoTokenizer.from_pretrained(folder)
    text = "ab<x>" * int(args.mb * 1_000_000 / 5)
    corpus = Corpus("hostile", [Document("huge", text)], "sha256:0")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    seqs = list(pack_sequences(corpus, tok, 32, args.tokens, 0))
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"{len(text) / 1e6:.0f} MB line, budget {args.tokens} tokens: {len(seqs)} sequences in {seconds:.2f} s, "
        f"peak RSS +{(peak - before) / 1024:.0f} MB (process {peak / 1024:.0f} MB)"
    )


if __name__ == "__main__":
    main()

"""Fixtures in tiers by cost: synthetic stores (no torch), a tiny random-init model (built from a
config, no download), the real default model (marked real_model). tests/tiers.py marks each test
with the tier its fixtures imply and guards the fast tier (tests/README.md)."""

from __future__ import annotations

import importlib.util
import random
import socket
import threading
from pathlib import Path

import pytest

from tests.reference import write_synthetic_store
from tests.tiers import (  # noqa: F401 (hooks)
    pytest_collection_modifyitems,
    pytest_runtest_makereport,
    pytest_runtest_protocol,
    pytest_sessionfinish,
    pytest_sessionstart,
)

pytest_plugins = ["pytester"]  # tests/test_tiers.py runs small sessions with the tier hooks

HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformer_lens") is not None
WORDS = (
    "the nation shall union state congress people war peace trade law year government public we our must "
    "great free new america world economy tax school health work family children energy security freedom"
).split()


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("synthetic") / "store")


@pytest.fixture(scope="session")
def built_site(tmp_path_factory, synthetic_store):
    from sitegen.site.build import build_site

    out = tmp_path_factory.mktemp("site") / "build"
    build_site([synthetic_store.root], out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def served_site(built_site):
    from sitegen.site.serve import make_server

    server = make_server(built_site, "127.0.0.1", free_port())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A folder of .txt and .jsonl documents of deterministic pseudo-English."""
    import orjson

    rng = random.Random(1)
    root = tmp_path_factory.mktemp("corpus")
    sentence = lambda: (
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize() + rng.choice([".", ".", "!", "?"])
    )
    for i in range(6):
        (root / f"speech-{i}.txt").write_text(" ".join(sentence() for _ in range(40)))
    with (root / "more.jsonl").open("wb") as f:
        for _ in range(4):
            f.write(orjson.dumps({"text": " ".join(sentence() for _ in range(15))}) + b"\n")
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_corpus) -> Path:
    """A random-init Llama-style (gated SiLU MLP, RMSNorm) model with a BPE tokenizer trained on
    the tiny corpus, saved as a local Hugging Face checkpoint folder."""
    if not HAS_TORCH:
        pytest.skip("needs the compute extra (torch, transformers, transformer-lens)")
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [p.read_text() for p in sorted(tiny_corpus.glob("*.txt"))]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<unk>", "<bos>", "<eos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<eos>"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the default init, so activations spread out
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    out = tmp_path_factory.mktemp("tiny-model") / "tiny-llama"
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out

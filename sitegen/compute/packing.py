"""Tokenise documents and pack them into fixed-length model inputs.

Each sequence is BOS + up to seq_len-1 tokens of ONE document (sequences never straddle
documents, so every snippet traces to one document and a character range in it). The last
piece of a document may be shorter; batches right-pad it, which cannot change the activations
of real positions in a causal model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from sitegen.corpus import Corpus
from sitegen.errors import CorpusError

MIN_SEQUENCE_TOKENS = 4  # shorter document tails carry too little context to be worth a row


@dataclass(frozen=True)
class PackedSequence:
    seq_id: int  # position in the packed stream; shards and merges key on it
    doc_id: str
    char_start: int  # character range of the document that the non-BOS tokens cover
    char_end: int
    token_ids: np.ndarray  # int32, exactly the model input (BOS included)


def bos_id(tokenizer: Any) -> int | None:
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return None


def pack_sequences(corpus: Corpus, tokenizer: Any, seq_len: int, max_tokens: int, seed: int) -> Iterator[PackedSequence]:
    """Yield packed sequences in a deterministic order until max_tokens model-input tokens."""
    bos = bos_id(tokenizer)
    body = seq_len - (1 if bos is not None else 0)
    seq_id = 0
    total = 0
    for doc in corpus.iter_documents(seed):
        try:
            enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        except NotImplementedError:
            raise CorpusError("the model's tokenizer cannot report character offsets; use a 'fast' (Rust) tokenizer") from None
        ids = enc["input_ids"]
        offsets = enc["offset_mapping"]
        for start in range(0, len(ids), body):
            chunk = ids[start:start + body]
            if len(chunk) < MIN_SEQUENCE_TOKENS:
                continue
            token_ids = np.asarray(([bos] if bos is not None else []) + list(chunk), dtype=np.int32)
            yield PackedSequence(
                seq_id=seq_id,
                doc_id=doc.doc_id,
                char_start=int(offsets[start][0]),
                char_end=int(offsets[start + len(chunk) - 1][1]),
                token_ids=token_ids,
            )
            seq_id += 1
            total += len(token_ids)
            if total >= max_tokens:
                return

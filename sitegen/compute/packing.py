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


# Documents are tokenised in windows of this many characters, so a huge document (a 10 MB line
# with no whitespace) costs one window's memory and only as many windows as the budget needs.
TOKENISE_WINDOW = 1 << 16


def _windows(text: str, window: int) -> Iterator[tuple[int, str]]:
    """(start, piece) covering text. A cut falls just before a run of whitespace when there is one
    in the window's second half: with a whitespace-splitting pre-tokenizer (GPT-2's byte-level BPE
    and its kind) no token crosses such a point, so the pieces tokenise as the whole text would.
    Text without whitespace is cut every `window` characters."""
    start = 0
    while start < len(text):
        end = min(start + window, len(text))
        if end < len(text):
            cut = end
            while cut > start + window // 2 and not (text[cut].isspace() and not text[cut - 1].isspace()):
                cut -= 1
            if cut > start + window // 2:
                end = cut
        yield start, text[start:end]
        start = end


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    except NotImplementedError:
        raise CorpusError(
            "the model's tokenizer cannot report character offsets; use a 'fast' (Rust) tokenizer"
        ) from None
    return enc["input_ids"], enc["offset_mapping"]


def pack_sequences(
    corpus: Corpus, tokenizer: Any, seq_len: int, max_tokens: int, seed: int, window: int = TOKENISE_WINDOW
) -> Iterator[PackedSequence]:
    """Yield packed sequences in a deterministic order until max_tokens model-input tokens.
    Tokenises each document window by window and stops as soon as the budget is reached."""
    bos = bos_id(tokenizer)
    prefix = [bos] if bos is not None else []
    body = seq_len - len(prefix)
    seq_id = 0
    total = 0
    for doc in corpus.iter_documents(seed):
        ids: list[int] = []  # this document's tokens read so far, ids[at:] not yet packed
        offsets: list[tuple[int, int]] = []
        at = 0
        pieces = _windows(doc.text, window)
        more = True
        while more or at < len(ids):
            if more and len(ids) - at < body:
                piece = next(pieces, None)
                if piece is None:
                    more = False
                    continue
                del ids[:at], offsets[:at]  # keep only the unpacked tail: memory stays one window
                at = 0
                start, text = piece
                new_ids, new_offsets = _encode(tokenizer, text)
                ids.extend(new_ids)
                offsets.extend((a + start, b + start) for a, b in new_offsets)
                continue
            chunk, chunk_offsets = ids[at : at + body], offsets[at : at + body]
            at += len(chunk)
            if len(chunk) < MIN_SEQUENCE_TOKENS:
                continue
            token_ids = np.asarray(prefix + chunk, dtype=np.int32)
            yield PackedSequence(
                seq_id=seq_id,
                doc_id=doc.doc_id,
                char_start=int(chunk_offsets[0][0]),
                char_end=int(chunk_offsets[-1][1]),
                token_ids=token_ids,
            )
            seq_id += 1
            total += len(token_ids)
            if total >= max_tokens:
                return

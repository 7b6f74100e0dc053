"""Per-sequence keys shared by compute and merge (pure Python, no torch)."""


def random_key(seed: int, seq_id: int) -> float:
    """A uniform [0, 1) key per sequence (splitmix64): the k sequences with the smallest keys are the
    'random' sample. It depends only on (seed, seq_id), so shards and merges pick the same ones."""
    z = (seed * 0x9E3779B97F4A7C15 + seq_id + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return (z >> 11) / float(1 << 53)


INTERVAL_STREAM = 0x1D0  # interval_key's stream: keys independent of random_key's for the same sequence


def interval_key(seed: int, seq_id: int) -> float:
    """A second uniform [0, 1) key per sequence, independent of `random_key`: the examples shown for
    each activation interval are its sequences with the smallest keys (neuroscope's
    IntervalExamples). A stream of its own, so they are not simply the random sample again."""
    return random_key(seed * 0x10000 + INTERVAL_STREAM, seq_id)

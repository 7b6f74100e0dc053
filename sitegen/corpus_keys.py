"""Per-sequence keys shared by compute and merge (pure Python, no torch)."""


def random_key(seed: int, seq_id: int) -> float:
    """A uniform [0, 1) key per sequence (splitmix64): the k sequences with the smallest keys are the
    'random' sample. It depends only on (seed, seq_id), so shards and merges pick the same ones."""
    z = (seed * 0x9E3779B97F4A7C15 + seq_id + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return (z >> 11) / float(1 << 53)

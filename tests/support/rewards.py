"""Out-of-tree rewards for tests: selected by dotted path in `data.reward`.

A random tiny model never answers a math problem, so trainer tests that need non-zero advantages
use a reward that varies with the text itself.
"""


def text_length_parity(response: str, reference: str) -> float:
    """1.0 for responses of even character length, else 0.0 (varied, deterministic)."""
    return float(len(response) % 2 == 0)

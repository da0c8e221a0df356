"""Out-of-tree rewards for tests: selected by dotted path in `data.reward`.

A random tiny model never answers a math problem, so trainer tests that need non-zero advantages
use a reward that varies with the text itself.
"""


def text_length_parity(response: str, reference: str) -> float:
    """1.0 for responses of even character length, else 0.0 (varied, deterministic)."""
    return float(len(response) % 2 == 0)


GRADED: list[str] = []   # what rank_dependent_parity graded in this process


def rank_dependent_parity(response: str, reference: str) -> float:
    """text_length_parity on even ranks, its complement on odd ones: a grader whose answer
    depends on the process that runs it (as one under a wall-clock limit can)."""
    import os

    GRADED.append(response)
    return float((len(response) + int(os.environ.get("RANK", "0"))) % 2 == 0)

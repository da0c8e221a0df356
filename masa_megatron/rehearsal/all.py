"""`python -m masa_megatron.rehearsal.all [--steps N] [--only SUBSTRING]` (`make rehearse-all`):
rehearse every single-node recipe one after another (each needs the whole machine's cores);
prints each recipe's failing checks as they come, then one summary line per recipe and the wall
time. Exit code 1 if any check of any recipe failed."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def single_node_recipes() -> list[str]:
    """Registered GPU recipes that run on one node (colocated SGLang)."""
    from recipes import get_recipe_info, list_recipes

    infos = [get_recipe_info(name) for name in list_recipes()]
    return [i.name for i in infos if i.arch is not None and i.train_nodes + i.rollout_nodes == 1]


def main(argv: list[str] | None = None) -> int:
    from masa_megatron.rehearsal.checks import FAIL, NOT_WIRED
    from masa_megatron.rehearsal.run import rehearse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", default="", help="rehearse the recipes whose name has this")
    parser.add_argument("--workdir", type=Path, default=None, help="keep each run's folder here")
    args = parser.parse_args(argv)
    names = [n for n in single_node_recipes() if args.only in n]
    started, summary = time.monotonic(), []
    for name in names:
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="masa-rehearse-") as tmp:
            root = (args.workdir / name) if args.workdir else Path(tmp)
            results = rehearse(name, args.steps, root, say=lambda m: None)
        failed = [c for c in results if c.status == FAIL]
        for check in failed:
            print(f"{name}: {check.line()}", flush=True)
        todo = [c.name for c in results if c.status == NOT_WIRED]
        summary.append(f"{'FAIL' if failed else 'PASS'} {name} {time.monotonic() - t0:.0f} s"
                       + (f" failed: {', '.join(c.name for c in failed)}" if failed else "")
                       + (f" not wired: {', '.join(todo)}" if todo else ""))
        print(summary[-1], flush=True)
    print("\n".join(["", *summary]))
    bad = sum(line.startswith("FAIL") for line in summary)
    print(f"rehearse-all: {len(names) - bad} of {len(names)} recipes passed in "
          f"{time.monotonic() - started:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

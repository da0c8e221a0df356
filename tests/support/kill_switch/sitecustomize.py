"""Test-only: make a training rank vanish at a chosen point, as a killed process does.

Put this folder first on PYTHONPATH and set MASA_TEST_KILL to a comma-separated list of
"<point>:<n>:<rank>[:<attempt>]" (attempt: torchrun's TORCHELASTIC_RESTART_COUNT, default 0).
In that attempt, global rank <rank> calls os._exit(9):

- `update:<n>`: entering Actor.update for the n-th time (the middle of an RL step, after
  generation);
- `sync_bucket:<n>`: sending the first broadcast weight-sync bucket of weight version n
  (BroadcastSync._send_bucket), after the servers were told to receive it: they are left
  waiting in the collective.

Nothing in the project imports this; it patches the classes right after their modules load.
"""
import importlib.abc
import importlib.util
import os
import sys

POINTS = {"update": ("masa_megatron.train.actor", "Actor", "update"),
          "sync_bucket": ("masa_megatron.rollout.weight_sync.broadcast", "BroadcastSync",
                          "_send_bucket")}


def _armed() -> list[tuple[str, int]]:
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    found = []
    for spec in filter(None, os.environ.get("MASA_TEST_KILL", "").split(",")):
        point, n, rank, *when = spec.split(":")
        if os.environ.get("RANK", "0") == rank and (when or ["0"])[0] == attempt:
            found.append((point, int(n)))
    return found


def _patch(module, point: str, n: int) -> None:
    _, cls_name, method = POINTS[point]
    cls = getattr(module, cls_name)
    real, seen = getattr(cls, method), [0]

    def wrapper(*args, **kwargs):
        seen[0] += 1
        hit = seen[0] == n if point == "update" else int(args[2]) == n   # (self, bucket, version)
        if hit:
            print(f"kill switch: rank {os.environ.get('RANK')} exits at {point} {n}",
                  file=sys.stderr, flush=True)
            os._exit(9)
        return real(*args, **kwargs)
    setattr(cls, method, wrapper)


class _AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, module_name: str, point: str, call: int):
        self.module_name, self.point, self.call = module_name, point, call

    def find_spec(self, name, path, target=None):
        if name != self.module_name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader, point, call = spec.loader, self.point, self.call

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                _patch(module, point, call)
        spec.loader = Loader()
        return spec


for _point, _n in _armed():
    sys.meta_path.insert(0, _AfterImport(POINTS[_point][0], _point, _n))

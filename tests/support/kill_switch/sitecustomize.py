"""Test-only: make a training rank vanish at a chosen point, as a killed process does.

Put this folder first on PYTHONPATH and set MASA_TEST_KILL="<point>:<call>:<rank>" in a run's
environment. In the first attempt only (TORCHELASTIC_RESTART_COUNT unset or 0), global rank
<rank> calls os._exit(9) at its <call>-th pass through <point>:

- `update`: entering Actor.update (the middle of an RL step, after generation);
- `sync_bucket`: sending a broadcast weight-sync bucket (BroadcastSync._send_bucket), after the
  servers were told to receive it: they are left waiting in the collective.

Nothing in the project imports this; it patches the classes right after their modules load.
"""
import importlib.abc
import importlib.util
import os
import sys

POINTS = {"update": ("masa_megatron.train.actor", "Actor", "update"),
          "sync_bucket": ("masa_megatron.rollout.weight_sync.broadcast", "BroadcastSync",
                          "_send_bucket")}


def _armed():
    spec = os.environ.get("MASA_TEST_KILL", "")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    point, call, rank = spec.split(":")
    if os.environ.get("RANK", "0") != rank:
        return None
    return point, int(call)


def _patch(module, point: str, call: int) -> None:
    _, cls_name, method = POINTS[point]
    cls = getattr(module, cls_name)
    real, seen = getattr(cls, method), [0]

    def wrapper(*args, **kwargs):
        seen[0] += 1
        if seen[0] == call:
            print(f"kill switch: rank {os.environ.get('RANK')} exits at {point} #{call}",
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


_ARMED = _armed()
if _ARMED is not None:
    sys.meta_path.insert(0, _AfterImport(POINTS[_ARMED[0]][0], *_ARMED))

"""Test-only: make a training rank vanish at a chosen point, as a killed process does, and keep
what the broadcast weight sync sent.

Put this folder first on PYTHONPATH.

MASA_TEST_KILL: a comma-separated list of "<point>:<n>:<rank>[:<attempt>]" (attempt: torchrun's
TORCHELASTIC_RESTART_COUNT, default 0). In that attempt, global rank <rank> calls os._exit(9):
- `update:<n>`: entering Actor.update for the n-th time (the middle of an RL step, after
  generation);
- `sync_bucket:<n>`: sending the first broadcast weight-sync bucket of weight version n
  (BroadcastSync._send_bucket), after the servers were told to receive it: they are left
  waiting in the collective;
- `handoff:<n>`: handing weight version n to the rollout engine after step n
  (Handoff.to_rollout, not the one at start): after step n's checkpoint, before its metrics row.

MASA_TEST_SENT_DIR: every sender saves the HF tensors it has broadcast for weight version v to
<dir>/v<v>-rank<RANK>.pt ({name: tensor}, rewritten after each bucket), and once the sync of
version v is over, what every server then reports (GET /standin/checksums and /standin/stats)
to <dir>/served-v<v>-rank<RANK>.json: a test can hash the final sync's tensors as the stand-in
hashes what it loaded, even though the job's end stops the servers.

Nothing in the project imports this; it patches the classes right after their modules load.
"""
import importlib.abc
import importlib.util
import json
import os
import sys

POINTS = {"update": ("masa_megatron.train.actor", "Actor", "update"),
          "sync_bucket": ("masa_megatron.rollout.weight_sync.broadcast", "BroadcastSync",
                          "_send_bucket"),
          "handoff": ("masa_megatron.train.handoff", "Handoff", "to_rollout")}


def _armed() -> list[tuple[str, int]]:
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    found = []
    for spec in filter(None, os.environ.get("MASA_TEST_KILL", "").split(",")):
        point, n, rank, *when = spec.split(":")
        if os.environ.get("RANK", "0") == rank and (when or ["0"])[0] == attempt:
            found.append((point, int(n)))
    return found


def _kill_at(point: str, n: int):
    def patch(module) -> None:
        _, cls_name, method = POINTS[point]
        cls = getattr(module, cls_name)
        real, seen = getattr(cls, method), [0]

        def wrapper(*args, **kwargs):
            seen[0] += 1
            if point == "update":
                hit = seen[0] == n
            elif point == "handoff":           # (self, engine, actor, version, at_start)
                hit = kwargs.get("version") == n and not kwargs.get("at_start", False)
            else:                               # (self, bucket, version)
                hit = int(args[2]) == n
            if hit:
                print(f"kill switch: rank {os.environ.get('RANK')} exits at {point} {n}",
                      file=sys.stderr, flush=True)
                os._exit(9)
            return real(*args, **kwargs)
        setattr(cls, method, wrapper)
    return patch


def _record_sent(folder: str):
    def patch(module) -> None:
        import torch

        cls = module.BroadcastSync
        real, sent = cls._send_bucket, {}

        def wrapper(self, bucket, version):
            real(self, bucket, version)
            named = sent.setdefault(int(version), {})
            named.update({name: tensor.detach().cpu().clone() for name, tensor in bucket})
            torch.save(named, os.path.join(folder, f"v{version}-rank{os.environ.get('RANK')}.pt"))
        cls._send_bucket = wrapper

        real_transfer = cls._transfer

        def after_transfer(self, model_chunks, version):
            out = real_transfer(self, model_chunks, version)
            if self.group is not None:                   # a sender: ask what the servers hold
                served = {url: {path: self.target.http.call(url, f"/standin/{path}",
                                                            method="GET").body
                                for path in ("checksums", "stats")}
                          for url in self.target.urls}
                name = f"served-v{version}-rank{os.environ.get('RANK')}.json"
                with open(os.path.join(folder, name), "w") as f:
                    json.dump(served, f)
            return out
        cls._transfer = after_transfer
    return patch


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `patch(module)` once `module_name` has been executed."""

    def __init__(self, module_name: str, patch):
        self.module_name, self.patch = module_name, patch

    def find_spec(self, name, path, target=None):
        if name != self.module_name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader, patch = spec.loader, self.patch

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                patch(module)
        spec.loader = Loader()
        return spec


for _point, _n in _armed():
    sys.meta_path.insert(0, _AfterImport(POINTS[_point][0], _kill_at(_point, _n)))
if os.environ.get("MASA_TEST_SENT_DIR"):
    sys.meta_path.insert(0, _AfterImport(POINTS["sync_bucket"][0],
                                         _record_sent(os.environ["MASA_TEST_SENT_DIR"])))

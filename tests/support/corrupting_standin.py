"""The stand-in SGLang server, broken on purpose for tests/test_rehearse.py: every weight update
it applies has its first tensor shifted by 1e-3 on every TP rank, as a server that loaded a
wrong shard would hold. Run as `python -m tests.support.corrupting_standin` with the
stand-in's flags."""
from tests.sglang_standin import server
from tests.sglang_standin.weights import TPRanks

_apply = TPRanks._apply


def _apply_corrupted(self, rank, named):
    named = [(name, tensor + 1e-3 if i == 0 else tensor) for i, (name, tensor) in enumerate(named)]
    _apply(self, rank, named)


TPRanks._apply = _apply_corrupted

if __name__ == "__main__":
    server.main()

"""Resumable sampler and the crash-safe checkpoint folder protocol (single process)."""
import pytest

from masa_megatron.data.sampler import ResumableSampler
from masa_megatron.train.checkpoint import CheckpointManager, load_trainer_state, save_trainer_state


def test_sampler_resumes_exactly_where_it_stopped():
    full = ResumableSampler(10, batch_size=4, seed=3)
    expected = [full.next_batch() for _ in range(6)]  # crosses several epochs
    first = ResumableSampler(10, batch_size=4, seed=3)
    got = [first.next_batch() for _ in range(2)]
    resumed = ResumableSampler(10, batch_size=4, seed=3)
    resumed.load_state_dict(first.state_dict())
    got += [resumed.next_batch() for _ in range(4)]
    assert got == expected


def test_sampler_visits_every_item_once_per_epoch_and_reshuffles():
    sampler = ResumableSampler(6, batch_size=3, seed=0)
    epoch0 = sampler.next_batch() + sampler.next_batch()
    epoch1 = sampler.next_batch() + sampler.next_batch()
    assert sorted(epoch0) == sorted(epoch1) == list(range(6))
    assert epoch0 != epoch1


def test_sampler_refuses_state_of_another_dataset():
    state = ResumableSampler(10, 2).state_dict()
    with pytest.raises(ValueError, match="training files changed"):
        ResumableSampler(11, 2).load_state_dict(state)


def write_marker(value):
    def write(folder):
        (folder / "payload.txt").write_text(str(value))
    return write


def test_checkpoint_is_renamed_into_place_and_latest_updated(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, log=lambda m: None)
    for step in (1, 2, 3):
        mgr.save(step, write_marker(step))
    names = [p.name for p in mgr.complete_checkpoints()]
    assert names == ["step_000002", "step_000003"]  # keep-last-2 retention
    assert (tmp_path / "latest").read_text().strip() == "step_000003"
    assert mgr.resolve("auto").name == "step_000003"
    assert mgr.resolve("none") is None


def test_interrupted_write_is_ignored_and_previous_checkpoint_resumed(tmp_path):
    messages = []
    mgr = CheckpointManager(tmp_path, log=messages.append)
    mgr.save(1, write_marker(1))

    def crash(folder):
        (folder / "payload.txt").write_text("half")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, crash)
    found = mgr.resolve("auto")
    assert found.name == "step_000001" and (found / "payload.txt").read_text() == "1"
    assert any("incomplete" in m for m in messages) and any("resuming" in m for m in messages)
    mgr.save(2, write_marker(2))  # the next save clears the stale temporary folder
    assert not list(tmp_path.glob(".tmp-*"))


def test_explicit_resume_path_must_be_complete(tmp_path):
    (tmp_path / "step_000005").mkdir()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        CheckpointManager(tmp_path).resolve(str(tmp_path / "step_000005"))


def test_trainer_state_restores_rng_streams(tmp_path):
    import random

    import torch
    torch.manual_seed(7)
    random.seed(7)
    save_trainer_state(tmp_path, {"step": 4, "sampler": {"epoch": 1}})
    expected = (torch.rand(3), random.random())
    torch.manual_seed(99)
    random.seed(99)
    common = load_trainer_state(tmp_path)
    assert common == {"step": 4, "sampler": {"epoch": 1}}
    got = (torch.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


def _dist_checkpoint(folder):
    """A real torch.distributed.checkpoint folder (.metadata + one .distcp shard)."""
    import torch
    import torch.distributed.checkpoint as dcp
    folder.mkdir(parents=True)
    dcp.save({"w": torch.arange(4096.0)}, checkpoint_id=str(folder), no_dist=True)
    return next(folder.glob("*.distcp"))


def _saved(mgr, step):
    return mgr.save(step, lambda folder: _dist_checkpoint(folder / "model"))


def test_damaged_shard_is_named_with_its_checkpoint(tmp_path):
    from masa_megatron.errors import UserError
    from masa_megatron.model.checkpoint_io import check_dist_checkpoint
    shard = _dist_checkpoint(tmp_path / "ckpt")
    check_dist_checkpoint(tmp_path / "ckpt")
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(UserError, match=rf"checkpoint {tmp_path / 'ckpt'} is damaged: shard "
                                        rf"{shard.name} has 100 bytes, its index needs \d+"):
        check_dist_checkpoint(tmp_path / "ckpt")
    shard.unlink()
    with pytest.raises(UserError, match=rf"shard {shard.name} is missing"):
        check_dist_checkpoint(tmp_path / "ckpt")


def test_resume_auto_names_a_damaged_checkpoint_and_falls_back_only_when_allowed(tmp_path):
    from masa_megatron.errors import UserError
    from masa_megatron.train.checkpoint import check_saved_checkpoint
    mgr = CheckpointManager(tmp_path, keep_last=5, log=lambda m: None,
                            verify=check_saved_checkpoint)
    _saved(mgr, 1)
    _saved(mgr, 2)
    shard = next((tmp_path / "step_000002" / "model").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(UserError, match=r"step_000002 is damaged: shard model/__0_0.distcp has "
                                        r"\d+ bytes, its index needs \d+; set "
                                        r"checkpoint.fallback_on_corrupt=true to resume from "
                                        r"step_000001"):
        mgr.resolve("auto")
    with pytest.raises(UserError, match=r"step_000002 is damaged"):
        mgr.resolve(str(tmp_path / "step_000002"))
    said = []
    mgr.log = said.append
    assert mgr.resolve("auto", fallback_on_corrupt=True) == tmp_path / "step_000001"
    assert any("step_000002 is damaged" in m and "falling back to step_000001" in m for m in said)
    # set aside, so it is neither resumed nor kept in place of newer saves
    assert (tmp_path / ".damaged-step_000002").is_dir()
    assert mgr.latest() == tmp_path / "step_000001"


def test_a_step_saved_but_not_evaluated_or_logged_is_seen_as_unfinished(tmp_path):
    """The resume finishes step N (eval when due, then its row) when its checkpoint exists but
    this run's metrics.jsonl lacks row N, or eval/ lacks N's due eval; nothing otherwise."""
    from masa_megatron.config import ExperimentConfig
    from masa_megatron.train.main import _step_unfinished

    cfg = ExperimentConfig()
    cfg.trainer.steps, cfg.trainer.eval_every, cfg.logging.log_every = 6, 2, 2
    assert not _step_unfinished(cfg, tmp_path, 2)          # no metrics.jsonl: another run's
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    assert _step_unfinished(cfg, tmp_path, 2)              # row 2 is there, its eval is not
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "step_000002.jsonl").write_text("")
    assert not _step_unfinished(cfg, tmp_path, 2)
    assert _step_unfinished(cfg, tmp_path, 4)              # row and eval due, neither written
    assert not _step_unfinished(cfg, tmp_path, 3)          # neither due at step 3
    cfg.trainer.eval_every = 0
    assert _step_unfinished(cfg, tmp_path, 4) and not _step_unfinished(cfg, tmp_path, 2)
    cfg.logging.jsonl = False
    assert not _step_unfinished(cfg, tmp_path, 4)          # no JSONL sink: nothing to read

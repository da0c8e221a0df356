"""The real trainer (Megatron actor, one process) driven by a scripted engine: MASA steps end to
end, rewards and advantages by hand, meta tokens trained in `masa` and absent in `grpo`."""
import json
import statistics

import pytest
import torch

from masa_megatron.config import ExperimentConfig, validate_static
from masa_megatron.data.tiny_tokenizer import make_tiny_tokenizer
from masa_megatron.model.tiny import make_tiny_hf_model
from masa_megatron.parallel import destroy_parallel, init_parallel
from masa_megatron.train.main import build_training
from masa_megatron.train.loop import run_loop, run_step
from tests.support.scripted_engine import ScriptedEngine
from tests.test_masa_planner_scoring import PROBLEMS, SCRIPT


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_policy")
    texts = [t for v in SCRIPT.values() for t in v] + [p for _, p, _ in PROBLEMS]
    tokenizer = make_tiny_tokenizer(texts * 4, vocab_size=400)
    tokenizer.save_pretrained(str(folder))
    make_tiny_hf_model(folder, "qwen3", vocab_size=len(tokenizer), max_position_embeddings=1024,
                       bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    rows = [{"prompt": [{"role": "user", "content": p}], "reward_model": {
        "ground_truth": {"target": a}}} for _, p, a in PROBLEMS]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def make_cfg(folder, tmp_path, mode):
    cfg = ExperimentConfig()
    cfg.model.hf_path = str(folder)
    cfg.data.train_files = [str(folder / "train.jsonl")]
    cfg.data.prompt_batch_size, cfg.data.shuffle = 3, False
    cfg.grpo.group_size, cfg.masa.meta_group_size, cfg.masa.mode = 4, 4, mode
    cfg.rollout.max_response_length, cfg.rollout.max_prompt_length = 64, 1024
    cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.optimizer.warmup_steps = 1e-2, 0.0, 0
    cfg.trainer.steps, cfg.trainer.output_dir = 2, str(tmp_path / mode)
    cfg.checkpoint.save_every, cfg.logging.progress = 0, False
    validate_static(cfg)
    return cfg


@pytest.fixture
def trainer(hf_folder, tmp_path):
    made = []

    def build(mode, **masa):
        cfg = make_cfg(hf_folder, tmp_path, mode)
        for key, value in masa.items():
            setattr(cfg.masa, key, value)
        init_parallel(cfg.parallel, seed=cfg.model.seed)
        parts, start = build_training(cfg, log=lambda m: None)
        parts.engine = parts.planner.engine = ScriptedEngine(parts.tokenizer, SCRIPT)
        updates = []
        real_update = parts.actor.update

        def spy(batch, check_ratio=False):
            updates.append(batch)
            return real_update(batch, check_ratio=check_ratio)
        parts.actor.update = spy
        made.append(parts)
        return parts, updates
    yield build
    destroy_parallel()


def embedding(parts):
    return parts.actor.model_chunks[0].module.embedding.word_embeddings.weight.detach().clone()


def test_masa_step_trains_solution_and_meta_groups_with_hand_computed_advantages(trainer):
    parts, updates = trainer("masa")
    metrics = run_step(parts, 0)
    batch = updates[0]
    tok = parts.tokenizer
    kinds = ["meta" if "<meta>" in tok.decode(p) else "solution" for p in batch.prompt_ids]
    assert kinds.count("solution") == 12 and kinds.count("meta") == 12
    sol_std = statistics.stdev([1, 0, 1, 1])
    p1_solutions = [(r - 0.75) / (sol_std + 1e-6) for r in (1, 0, 1, 1)]
    meta_rewards = [1.0, (0.01 ** 0.25) / 3, 0.0, 0.0]
    m_mean, m_std = statistics.mean(meta_rewards), statistics.stdev(meta_rewards)
    p1_metas = [(r - m_mean) / (m_std + 1e-6) for r in meta_rewards]
    assert batch.advantages[:4].tolist() == pytest.approx(p1_solutions, abs=1e-5)
    assert batch.advantages[4:8].tolist() == pytest.approx(p1_metas, abs=1e-5)
    # P1 3/4, P2 4/4, P3 3/4 (its long solution fits 64 tokens here, so it is not cut)
    assert metrics["solution/accuracy"] == pytest.approx(10 / 12)
    assert metrics["meta/parse_rate"] == pytest.approx((2 + 4 + 1) / 12)
    assert metrics["train/ratio_dev_max"] < 1e-5  # old log-probs recomputed: ratio 1
    for phase in ("generate", "score", "logprob", "train", "weight_sync"):
        assert metrics[f"time/{phase}"] >= 0


def meta_only_token_ids(parts, batch):
    tok = parts.tokenizer
    meta, solution = set(), set()
    for p, r in zip(batch.prompt_ids, batch.response_ids):
        (meta if "<meta>" in tok.decode(p) else solution).update(p + r)
    return sorted(meta - solution)


def test_meta_tokens_receive_gradient_in_masa_only(trainer, hf_folder):
    parts, updates = trainer("masa")
    before = embedding(parts)
    run_step(parts, 0)
    meta_ids = meta_only_token_ids(parts, updates[0])
    assert meta_ids
    changed = (embedding(parts)[meta_ids] - before[meta_ids]).abs().amax(dim=1)
    assert (changed > 0).float().mean() > 0.9
    destroy_parallel()

    parts, updates = trainer("grpo")
    before = embedding(parts)
    run_step(parts, 0)
    assert all("<meta>" not in parts.tokenizer.decode(p) for p in updates[0].prompt_ids)
    assert torch.equal(embedding(parts)[meta_ids], before[meta_ids])


def test_loop_logs_every_section9_metric(trainer, tmp_path):
    parts, _ = trainer("masa")
    run_loop(parts, 0)
    parts.sinks.close()
    rows = [json.loads(line) for line in (tmp_path / "masa" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("solution/accuracy", "meta/parse_rate", "meta/parse_rate_reference",
                "meta/r_score", "meta/r_notion", "meta/r_difficulty", "meta/r_length",
                "meta/pass_rate_mae", "meta/pass_rate_corr", "meta/length_mae",
                "gating/fraction", "cutoff/fraction", "tokens/meta", "tokens/solution",
                "time/generate", "time/score", "time/logprob", "time/train", "time/weight_sync"):
        assert key in rows[-1], key


def test_meta_head_is_trained_in_the_loop_and_saved_with_checkpoints(trainer, tmp_path):
    parts, _ = trainer("masa", predictor="both")
    first = run_step(parts, 0)
    assert "head/loss" in first and "head/pass_rate_mae" in first
    later = run_step(parts, 1)
    assert later["head/loss"] < first["head/loss"]
    parts.save_checkpoint(2)
    ckpt = tmp_path / "masa" / "checkpoints" / "step_000002"
    assert (ckpt / "meta_head.safetensors").is_file() and (ckpt / "COMPLETE").is_file()

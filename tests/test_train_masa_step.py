"""The real trainer (Megatron actor, one process) driven by a scripted engine: MASA steps end to
end, rewards and advantages by hand, meta tokens trained in `masa` and absent in `grpo`."""
import copy
import json
import math
import statistics

import pytest
import torch

from masa_megatron.config import ExperimentConfig
from masa_megatron.config_checks import validate_static
from masa_megatron.data.prompts import render_solution_prompt
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
    for phase in ("generate", "score", "logprob", "train"):   # the sync follows the step
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


def backbone_grads(parts):
    """The last update's gradients of every policy parameter (Megatron DDP's main_grad)."""
    return [p.main_grad.detach().clone() for p in parts.actor.model_chunks[0].module.parameters()]


def test_detached_head_leaves_the_backbone_gradients_as_without_a_head(trainer):
    parts, _ = trainer("masa", predictor="text")
    run_step(parts, 0)
    without_head = backbone_grads(parts)
    destroy_parallel()
    parts, updates = trainer("masa", predictor="both", head_loss_weight=0.0)
    metrics = run_step(parts, 0)
    assert "head/loss" in metrics and "train/prompt_state_loss" not in metrics
    assert updates[0].prompt_targets is None
    assert all(torch.equal(a, b) for a, b in zip(without_head, backbone_grads(parts)))


def test_joint_head_loss_trains_the_backbone_and_the_head_still_learns(trainer):
    # step 0 fits the zero-initialised head, whose input gradient is zero until then: use step 1
    parts, _ = trainer("masa", predictor="text")
    for step in (0, 1):
        run_step(parts, step)
    without_head = backbone_grads(parts)
    destroy_parallel()
    weight = 0.5
    parts, updates = trainer("masa", predictor="both", head_loss_weight=weight)
    first = run_step(parts, 0)
    prompts = [render_solution_prompt(parts.tokenizer, p, parts.planner.prompts)
               for _, p, _ in PROBLEMS]
    hidden = parts.actor.prompt_last_hidden(prompts)  # the states step 1's update sees
    head = copy.deepcopy(parts.head.head)              # before step 1's head fit
    later = run_step(parts, 1)
    diff = max((a - b).abs().max().item() for a, b in zip(without_head, backbone_grads(parts)))
    assert diff > 1e-6
    assert later["head/loss"] < first["head/loss"]
    # the term is w x MetaHead.loss on the solution rows' prompt states (metas have no target);
    # each group has its G rows, so this mean over rows is the mean over problems
    batch = updates[1]
    rows = [i for i, t in enumerate(batch.prompt_targets[:, 0].tolist()) if not math.isnan(t)]
    assert len(rows) == 12
    states = torch.stack([hidden[prompts.index(batch.prompt_ids[i])] for i in rows])
    targets = batch.prompt_targets[rows]
    expected, _ = head.loss(states, targets[:, 0], targets[:, 1].exp())
    assert later["train/prompt_state_loss"] == pytest.approx(weight * expected.item(), rel=1e-4)


def test_trainer_hands_every_engine_the_whole_config(hf_folder, tmp_path):
    """SGLang needs model.hf_path and trainer.output_dir besides the rollout section, so the
    trainer builds any registered engine from the ExperimentConfig."""
    from masa_megatron.rollout.base import ENGINES
    from masa_megatron.rollout.embedded import EmbeddedEngine

    seen = []

    class Recording(EmbeddedEngine):
        @classmethod
        def from_config(cls, model, cfg, **kwargs):
            seen.append(cfg)
            return super().from_config(model, cfg, **kwargs)

    ENGINES.register("test-recording", Recording, override=True)
    cfg = make_cfg(hf_folder, tmp_path, "grpo")
    cfg.rollout.engine = "test-recording"
    init_parallel(cfg.parallel, seed=cfg.model.seed)
    try:
        parts, _ = build_training(cfg, log=lambda m: None)
        assert isinstance(parts.engine, Recording)
        assert seen and seen[0] is cfg and seen[0].model.hf_path == str(hf_folder)
    finally:
        destroy_parallel()


def test_ids_between_the_tokenizer_and_the_model_vocabulary_train_with_finite_loss(
        tmp_path_factory, tmp_path):
    """The engine samples over the model's vocabulary (config.json vocab_size, 151,936 for Qwen3),
    which exceeds the tokenizer's (151,669): such ids must get finite log-probs and loss; only
    Megatron's own padding beyond vocab_size stays at -inf."""
    from masa_megatron.train.batching import TrainBatch

    folder = tmp_path_factory.mktemp("tiny_policy_big_vocab")
    texts = [t for v in SCRIPT.values() for t in v] + [p for _, p, _ in PROBLEMS]
    tokenizer = make_tiny_tokenizer(texts * 4, vocab_size=400)
    tokenizer.save_pretrained(str(folder))
    model_vocab = len(tokenizer) + 37
    make_tiny_hf_model(folder, "qwen3", vocab_size=model_vocab, max_position_embeddings=1024,
                       bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    rows = [{"prompt": [{"role": "user", "content": p}], "reward_model": {
        "ground_truth": {"target": a}}} for _, p, a in PROBLEMS]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_cfg(folder, tmp_path, "grpo")
    init_parallel(cfg.parallel, seed=cfg.model.seed)
    try:
        parts, _ = build_training(cfg, log=lambda m: None)
        beyond_tokenizer = [len(tokenizer), len(tokenizer) + 5, model_vocab - 1]
        batch = TrainBatch([[3, 4, 5], [6, 7]], [beyond_tokenizer, [8, model_vocab - 2]],
                           advantages=[1.0, -1.0], group_ids=[0, 0])
        logprob_metrics = parts.actor.compute_old_logprobs(batch)
        assert all(bool(torch.isfinite(x).all()) for x in batch.old_logprobs)
        assert math.isfinite(logprob_metrics["logprob/entropy_mean"])
        metrics = parts.actor.update(batch, check_ratio=True)
        assert metrics["train/skipped_step"] == 0 and math.isfinite(metrics["train/loss"])
    finally:
        destroy_parallel()


def test_audit_time_and_tokens_are_logged_apart_from_the_step(trainer):
    """masa_efficient with every gated problem audited: time/audit holds the audited solutions'
    generation (slowed by 0.5 s here) and time/step leaves it out; tokens/audit is apart from
    tokens/total."""
    import time as clock
    parts, _ = trainer("masa_efficient", efficient_start_step=0, audit_fraction=1.0)
    real = parts.planner.roll_out_audits

    def slow(*args, **kwargs):
        clock.sleep(0.5)
        return real(*args, **kwargs)
    parts.planner.roll_out_audits = slow
    started = clock.perf_counter()
    metrics = run_step(parts, 0)
    wall = clock.perf_counter() - started
    assert metrics["gating/audited"] >= 1 and metrics["tokens/audit"] > 0
    assert metrics["time/audit"] >= 0.5
    assert metrics["time/step"] <= wall - 0.5
    assert metrics["tokens/total"] == metrics["tokens/solution"] + metrics["tokens/meta"]


def test_loop_scores_metas_with_the_configured_notion_rules(trainer, monkeypatch):
    """masa.notion_rules reaches the loop's meta scoring; the balancing switch re-deals samples
    (one rank: the same batch) before the update."""
    import masa_megatron.train.loop as loop
    seen = []
    real = loop.score_metas

    def spy(item, stats, base, rules="spec"):
        seen.append(rules)
        return real(item, stats, base, rules)
    monkeypatch.setattr(loop, "score_metas", spy)
    parts, updates = trainer("masa", notion_rules="reference")
    parts.cfg.grpo.balance_sequences = True
    run_step(parts, 0)
    assert seen and set(seen) == {"reference"}
    assert len(updates[0]) == 24


class _MeteredEngine(ScriptedEngine):
    """Reports different rollout metrics for the step's chained call and for later calls."""
    def generate_chained(self, requests, follow, stream=True):
        results = super().generate_chained(requests, follow, stream)
        self.rollout_metrics = {"rollout/phase_s": 1.5, "rollout/busy_fraction_mean": 0.75}
        return results

    def generate(self, requests):
        self.rollout_metrics = {"rollout/phase_s": 9.0}
        return super().generate(requests)


def test_step_logs_the_generation_phase_metrics_and_micro_batch_padding(trainer):
    """The engine's metrics of the step's generation (not of the audits after it) and the
    update's padding fraction are in the step's metrics."""
    parts, _ = trainer("masa_efficient", efficient_start_step=0, audit_fraction=1.0)
    parts.engine = parts.planner.engine = _MeteredEngine(parts.tokenizer, SCRIPT)
    metrics = run_step(parts, 0)
    assert metrics["gating/audited"] >= 1                  # an audit call ran after the step's
    assert metrics["rollout/phase_s"] == 1.5 and metrics["rollout/busy_fraction_mean"] == 0.75
    assert 0.0 < metrics["train/padding_fraction"] < 1.0

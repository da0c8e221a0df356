"""`masa train`: build every part of a run from the config, resume if asked, run the loop.

Run as one process (world size 1) or under torchrun; every rank executes this file (SPMD).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from masa_megatron.config import ExperimentConfig, load_config, to_yaml
from masa_megatron.config_checks import optimizer_steps_per_rl_step, validate_environment
from masa_megatron.errors import UserError

EVAL_SUBSET_SEED = 0


def build_training(cfg: ExperimentConfig, *, log=print):
    """Model, optimizer, actor, engine, data, planner, head, checkpoints -> (LoopParts, start)."""
    from masa_megatron.data.chat_tokenizer import load_chat_tokenizer
    from masa_megatron.data.prompts import filter_by_prompt_length
    from masa_megatron.data.sampler import ResumableSampler
    from masa_megatron.eval.benchmarks import read_problems
    from masa_megatron.masa.meta_head import JointHeadLoss, MetaHeadTrainer
    from masa_megatron.masa.planner import RolloutPlanner, prompt_config_from
    from masa_megatron.masa.policies import resolve_policies
    from masa_megatron.masa.predictors import head_in_use
    from masa_megatron.metrics import Progress, is_logging_rank, open_sinks
    from masa_megatron.model import build_gpt_model, load_hf_weights
    from masa_megatron.model.checkpoint_io import read_checkpoint_meta
    from masa_megatron.model.hf_config import read_hf_config
    from masa_megatron.rewards.meta import parse_meta_prediction
    from masa_megatron.rewards.registry import get_batch_reward
    from masa_megatron.rollout.base import get_engine_class
    from masa_megatron.train.actor import Actor
    from masa_megatron.train.checkpoint import (CheckpointManager, check_saved_checkpoint,
                                                load_data_parallel_list,
                                                load_trainer_state)
    from masa_megatron.train.dist import DataParallelInfo
    from masa_megatron.train.handoff import Handoff
    from masa_megatron.train.loop import LoopParts
    from masa_megatron.train.optim import build_optimizer, wrap_ddp

    out_dir = Path(cfg.trainer.output_dir)
    checkpoints = CheckpointManager(cfg.checkpoint.dir or out_dir / "checkpoints",
                                    cfg.checkpoint.keep_last, log=log if is_logging_rank() else
                                    (lambda m: None), verify=check_saved_checkpoint)
    resume_from = checkpoints.resolve(cfg.checkpoint.resume, cfg.checkpoint.fallback_on_corrupt)
    tokenizer = load_chat_tokenizer(cfg.model.hf_path, "model.hf_path")
    problems, skipped = [], 0
    for i, path in enumerate(cfg.data.train_files):
        bench = read_problems(path, what=f"data.train_files[{i}]")
        problems += bench.problems
        skipped += bench.n_skipped
    problems, too_long = filter_by_prompt_length(
        problems, tokenizer, prompt_config_from(cfg), problem_of=lambda p: p.problem,
        with_meta=cfg.masa.mode != "grpo")
    if is_logging_rank():
        log(f"data: {len(problems)} training problems ({skipped} malformed rows skipped, "
            f"{too_long} dropped for a prompt over {cfg.rollout.max_prompt_length} tokens)")
    if not problems:
        raise UserError("data.train_files: no usable training problems")
    handoff = Handoff.from_config(cfg)

    def make_engine(model):   # the whole config: SGLang
        return get_engine_class(cfg.rollout.engine).from_config(
            model, cfg, vocab_size=read_hf_config(cfg.model.hf_path)["vocab_size"],
            eos_token_ids=[tokenizer.eos_token_id])
    engine = None
    if cfg.rollout.colocate:   # SGLang sizes its KV cache from the memory free at its start:
        engine = make_engine(None)    # servers first, then they release it for the trainer
        handoff.start(engine)
    # a checkpoint saved at another TP has another padded vocabulary: build with its size
    padded = (read_checkpoint_meta(resume_from / "model")["padded_vocab_size"]
              if resume_from is not None else None)
    model = build_gpt_model(cfg.model.hf_path, cfg.model, padded_vocab=padded)
    if resume_from is None and not cfg.model.random_init:
        load_hf_weights(model, cfg.model.hf_path, progress=is_logging_rank())
    chunks = wrap_ddp([model], cfg.parallel, cfg.optimizer.name)
    steps = cfg.trainer.steps * optimizer_steps_per_rl_step(cfg)
    optimizer, scheduler = build_optimizer(chunks, cfg.optimizer, cfg.parallel, cfg.model.dtype,
                                           total_steps=steps)
    # the ids an engine can sample: the model's vocabulary (config.json), which may exceed the
    # tokenizer's (Qwen3: 151,936 vs 151,669); only Megatron's padding beyond it is masked
    vocab = model.masa_hf_config["vocab_size"]
    actor = Actor(chunks, optimizer, scheduler, cfg.grpo, temperature=cfg.rollout.temperature,
                  vocab_size=vocab, ratio_tolerance=cfg.trainer.ratio_tolerance)
    log("actor: shared-prefix micro-batches " + ("on" if not actor.shared_prefix_off else
        f"off ({', '.join(actor.shared_prefix_off)})"))
    engine = engine or make_engine(model)

    sampler = ResumableSampler(len(problems), cfg.data.prompt_batch_size, cfg.data.seed,
                               cfg.data.shuffle)
    planner = RolloutPlanner(cfg, tokenizer, engine, *resolve_policies(cfg.masa))
    head = None
    dp = DataParallelInfo.from_megatron()
    if head_in_use(cfg.masa) and actor.is_last_stage:
        head = MetaHeadTrainer(model.config.hidden_size, lr=cfg.masa.head_lr,
                               data_parallel_group=dp.group if dp.size > 1 else None)
        if cfg.masa.head_loss_weight > 0:  # joint: the head's loss also trains the backbone
            actor.prompt_state_loss = JointHeadLoss(head.head, cfg.masa.head_loss_weight)

    logging_rank = is_logging_rank()
    parts = LoopParts(
        cfg=cfg, tokenizer=tokenizer, problems=problems, sampler=sampler, planner=planner,
        actor=actor, engine=engine, grade_batch=get_batch_reward(cfg.data.reward),
        sinks=None,                                  # opened below, once the start step is known
        dp=dp, head=head, checkpoints=checkpoints, handoff=handoff,
        progress=Progress(cfg.trainer.steps, cfg.name, enabled=cfg.logging.progress and
                          logging_rank),
        reference_parse=lambda text: parse_meta_prediction(text, "reference"))
    parts.save_checkpoint = lambda step, metrics=None: save_checkpoint(parts, step, metrics)
    if cfg.trainer.eval_every:
        parts.evaluator, parts.eval_problems = build_evaluator(cfg, engine, tokenizer, actor, head,
                                                               handoff)
    start = 0
    if resume_from is not None:
        actor.load_checkpoint(str(resume_from / "model"))
        common = load_trainer_state(resume_from)
        sampler.load_state_dict(common["sampler"])
        head_file = resume_from / HEAD_STATE
        head_state = (torch.load(head_file, weights_only=False) if head_file.is_file()
                      else common.get("head"))   # checkpoints before the head had its own file
        if head is not None and head_state is not None:
            head.load_state_dict(head_state)
        parts.bc_buffer = (load_data_parallel_list(resume_from, "bc_buffer", dp.rank, dp.size)
                           if "bc_buffer" not in common else list(common["bc_buffer"]))
        parts.nonfinite_streak = common.get("nonfinite_streak", 0)
        start = common["step"]
        if common.get("metrics") and _step_unfinished(cfg, out_dir, start):
            parts.unlogged_row = dict(common["metrics"])
            if logging_rank:
                log(f"step {start} was saved but its eval or metrics row was not written (the "
                    f"run stopped in between): both are done now, from the checkpoint")
        parts.progress.step = parts.progress._s0 = start
    # colocated: the servers released their weights; attached: they may hold another
    # attempt's weights. Either way they are synced before the first generation.
    if resume_from is not None or cfg.rollout.colocate or getattr(engine, "attached", False):
        handoff.to_rollout(engine, actor, version=start, at_start=True)
    if logging_rank:   # rows of the steps about to be rerun are dropped: one row per step
        parts.sinks = open_sinks(cfg.logging, out_dir, cfg.name, config=None, resume_step=start)
    return parts, start


def _step_unfinished(cfg: ExperimentConfig, out_dir: Path, step: int) -> bool:
    """Whether this run stopped after `step`'s checkpoint and before the end of the step: its
    due metrics row is missing from metrics.jsonl, or its due eval from eval/. Rank 0 looks,
    every rank gets the answer (the eval is collective). A run resumed from another run's
    checkpoint into a new folder has no metrics.jsonl: nothing to finish. Without a JSONL sink
    a missing row cannot be seen (TensorBoard and W&B are not read back)."""
    import logging

    from masa_megatron.metrics import is_logging_rank, read_jsonl
    from masa_megatron.parallel import broadcast_from_rank0

    unfinished = False
    path = Path(out_dir) / "metrics.jsonl"
    if is_logging_rank() and cfg.logging.jsonl and path.is_file():
        try:
            row_due = step % cfg.logging.log_every == 0
            eval_due = bool(cfg.trainer.eval_every) and (step % cfg.trainer.eval_every == 0
                                                         or step == cfg.trainer.steps)
            unfinished = (row_due and all(r.get("step") != step for r in read_jsonl(path))) or \
                (eval_due and not (Path(out_dir) / "eval" / f"step_{step:06d}.jsonl").is_file())
        except OSError as err:      # never leave the other ranks waiting in the broadcast
            logging.getLogger(__name__).warning("cannot read %s (%s): step %d is not finished "
                                                "again", path, err, step)
    return bool(broadcast_from_rank0(unfinished))


def build_evaluator(cfg: ExperimentConfig, engine, tokenizer, actor, head, handoff=None):
    """In-loop evaluation on data.eval_files (or a fixed seeded sample of trainer.eval_subset of
    them): trainer.eval_n solutions and eval_meta_n meta rollouts per problem (meta rollouts in
    every mode, so a GRPO run is a control for MASA), at trainer.eval_temperature and
    eval_top_p. The head's predictions need the trainer's parameters: `handoff` brings them
    back while the servers generate."""
    import copy

    from masa_megatron.eval.benchmarks import read_problems, seeded_sample
    from masa_megatron.eval.run import Evaluator, head_predictor
    from masa_megatron.masa.predictors import head_in_use
    eval_cfg = copy.deepcopy(cfg)
    eval_cfg.masa.mode = "masa" if cfg.trainer.eval_meta_n > 0 else "grpo"
    eval_cfg.masa.notion_hints = False
    eval_cfg.grpo.group_size = cfg.trainer.eval_n
    eval_cfg.masa.meta_group_size = max(1, cfg.trainer.eval_meta_n)
    eval_cfg.rollout.temperature = cfg.trainer.eval_temperature
    if cfg.trainer.eval_top_p is not None:
        eval_cfg.rollout.top_p = cfg.trainer.eval_top_p
    problems = [(bench.name, p) for i, path in enumerate(cfg.data.eval_files)
                for bench in [read_problems(path, what=f"data.eval_files[{i}]")]
                for p in bench.problems]
    if cfg.trainer.eval_subset:   # fixed across steps and runs: seed EVAL_SUBSET_SEED
        keep = {p.id for p in seeded_sample([p for _, p in problems], cfg.trainer.eval_subset,
                                            EVAL_SUBSET_SEED)}
        problems = [(name, p) for name, p in problems if p.id in keep]
    predict = (head_predictor(actor, head.head if head is not None else None)
               if head_in_use(cfg.masa) else None)
    if handoff is not None:
        predict = handoff.wrap(predict)
    return Evaluator(engine, tokenizer, eval_cfg, predict), problems


HEAD_STATE = "trainer/meta_head.pt"   # the meta-head and its optimiser, in a checkpoint


def _writes_the_head() -> bool:
    """The first rank of the last pipeline stage (every rank there holds the same head) saves
    it; called where the head exists, i.e. on the last stage."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return True
    from megatron.core import parallel_state as ps
    return ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0


def save_checkpoint(parts, step: int, metrics: Optional[dict] = None) -> None:
    """Collective. `metrics`: the step's row so far, kept so a resume can still log it."""
    from masa_megatron.metrics import is_logging_rank
    from masa_megatron.train.checkpoint import save_trainer_state

    from masa_megatron.compat.megatron_versions import use_fork_for_checkpoint_queue
    from masa_megatron.model.checkpoint_io import write_checkpoint_metadata

    use_fork_for_checkpoint_queue()

    def write(folder: Path) -> None:
        parts.actor.save_checkpoint(str(folder / "model"))
        write_checkpoint_metadata(parts.actor.model_chunks, folder / "model",
                                  hf_source_dir=parts.cfg.model.hf_path)
        save_trainer_state(
            folder, {"step": step, "sampler": parts.sampler.state_dict(),
                     "nonfinite_streak": parts.nonfinite_streak,
                     "metrics": dict(metrics or {})},
            rank_state={"bc_buffer": parts.bc_buffer, "dp_rank": parts.dp.rank,
                        "dp_size": parts.dp.size})
        if is_logging_rank():
            (folder / "config.yaml").write_text(to_yaml(parts.cfg))
        if parts.head is not None and _writes_the_head():
            from masa_megatron.masa.meta_head import export_meta_head
            torch.save(parts.head.state_dict(), folder / HEAD_STATE)
            export_meta_head(parts.head.head, folder)

    parts.checkpoints.save(step, write)


def run_training(config: Optional[str], overrides: list[str], recipe: Optional[str] = None,
                 log=print) -> int:
    base = None
    if recipe:
        from recipes import get_recipe
        base = get_recipe(recipe)
    cfg = load_config(config, overrides, base=base)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate_environment(cfg, world_size=world)
    import contextlib

    from masa_megatron.lifecycle import output_lock
    with contextlib.ExitStack() as held:   # two runs never share an output or checkpoint folder
        held.enter_context(output_lock(cfg.trainer.output_dir, "trainer.output_dir"))
        if cfg.checkpoint.dir:
            held.enter_context(output_lock(cfg.checkpoint.dir, "checkpoint.dir"))
        return _train(cfg, world, log)


def _train(cfg: ExperimentConfig, world: int, log) -> int:
    from masa_megatron.parallel import destroy_parallel, init_parallel
    from masa_megatron.train.loop import run_loop

    init_parallel(cfg.parallel, seed=cfg.model.seed)
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        parts, start = build_training(cfg, log=log)
        if start >= cfg.trainer.steps and parts.unlogged_row is None:
            log(f"nothing to do: the checkpoint is at step {start} >= trainer.steps")
        else:    # (a last step saved but not logged: run_loop only finishes it)
            run_loop(parts, start)
        if parts.sinks is not None:
            parts.sinks.close()
        parts.engine.shutdown()
    finally:
        destroy_parallel()
    return 0

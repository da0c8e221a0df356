"""`masa eval`: pass@k and meta-awareness of a checkpoint, on the same engines as training.

    masa eval MODEL --benchmarks aime2025,amc23,math_test500 --n 32 --temperature 0.6 \
        --max-tokens 16384 --meta-n 8 --out runs/eval

MODEL is a Hugging Face folder (config.json + safetensors; a `meta_head.safetensors` next to it
adds head predictions) or a training checkpoint folder (`step_NNNNNN/` with `model/`). For every
problem: n solution rollouts (graded by the project's grader) and, unless --meta-n 0, m meta
rollouts (parsed; text predictions) — the same prompts and parser as training. One JSON line per
finished problem goes to `<out>/results.jsonl`; an interrupted evaluation continues where it
stopped (sampling seeds depend on the problem id, not on the batch, so a resumed run equals an
uninterrupted one). `<out>/manifest.json` (eval/manifest.py) records the model, benchmark files and
settings; a run whose own differ stops naming them (`--restart` discards the old results).
The report (`report.json`, `summary.md`, plots) is written at the end.

Runs in one process, or under torchrun for tensor/pipeline parallel generation (rank 0 writes).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional, Sequence

from masa_megatron.errors import UserError


def load_policy(model_path: str | Path, model_cfg=None):
    """(model, tokenizer, hf_dir, meta_head or None) from an HF folder or training checkpoint.

    Call after `parallel.init_parallel`; every rank of the model-parallel group calls it."""
    from masa_megatron.config import ModelConfig
    from masa_megatron.data.chat_tokenizer import load_chat_tokenizer
    from masa_megatron.masa.meta_head import HEAD_FILE, load_meta_head
    from masa_megatron.model import build_gpt_model, load_hf_weights
    from masa_megatron.model.checkpoint_io import (HF_SUBDIR, load_dist_checkpoint,
                                                  read_checkpoint_meta)

    path = Path(model_path)
    model_cfg = model_cfg or ModelConfig(hf_path=str(path))
    if (path / "config.json").is_file():
        hf_dir, ckpt = path, None
    elif (path / "model" / HF_SUBDIR / "config.json").is_file():
        hf_dir, ckpt = path / "model" / HF_SUBDIR, path / "model"
    else:
        raise UserError(f"model '{path}': neither a Hugging Face folder (config.json) nor a "
                        f"training checkpoint (model/{HF_SUBDIR}/config.json)")
    model_cfg.hf_path = str(hf_dir)
    tokenizer = load_chat_tokenizer(hf_dir, "model")
    padded = read_checkpoint_meta(ckpt)["padded_vocab_size"] if ckpt is not None else None
    model = build_gpt_model(str(hf_dir), model_cfg, padded_vocab=padded)
    if ckpt is None:
        load_hf_weights(model, hf_dir)
    else:
        load_dist_checkpoint(model, ckpt)
    head = load_meta_head(path) if (path / HEAD_FILE).is_file() else None
    return model, tokenizer, hf_dir, head


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="masa eval", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="HF folder or training checkpoint folder")
    p.add_argument("--benchmarks", default="aime2025,amc23,math_test500",
                   help="comma-separated names (aime2025, math_test, math_test500; the paper's "
                        "aime24, aime25, amc23, math500, minerva, olympiadbench) or "
                        ".parquet/.jsonl paths")
    p.add_argument("--n", type=int, default=32, help="solutions per problem")
    p.add_argument("--meta-n", type=int, default=8, help="meta rollouts per problem (0: none)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=16384, help="max new tokens per rollout")
    p.add_argument("--max-prompt-tokens", type=int, default=2048)
    p.add_argument("--max-source", choices=("response", "prompt"), default="response",
                   help="what {MAX} in the meta prompt stands for")
    p.add_argument("--limit", type=int, default=None, help="first N problems per benchmark")
    p.add_argument("--problems-per-batch", type=int, default=16)
    p.add_argument("--data-dir", default=None, help="folder of the benchmark files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parser", choices=("robust", "reference"), default="robust")
    p.add_argument("--protocol", choices=("spec", "reference"), default="spec",
                   help="defaults of --suffix and --answer-fallback: spec (on, none) or the "
                        "authors' evaluation (off, qwen_math)")
    p.add_argument("--suffix", choices=("on", "off"), default=None,
                   help="append the training instruction to the solution prompt")
    p.add_argument("--answer-fallback", choices=("none", "qwen_math"), default=None,
                   help="grading without \\boxed{}: none (score 0) or qwen_math ('the answer "
                        "is ...', else the last number)")
    p.add_argument("--notion-rules", choices=("spec", "reference"), default="spec",
                   help="notion reward rules of the reported meta rewards")
    p.add_argument("--problem-field", default=None,
                   help="column of the problem text in non-verl files: FIELD or NAME=FIELD,...")
    p.add_argument("--answer-field", default=None,
                   help="column of the answer in non-verl files: FIELD or NAME=FIELD,...")
    p.add_argument("--out", default="runs/eval", help="output folder (results + report)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (under torchrun)")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size (under torchrun)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--restart", action="store_true",
                   help="discard the results already in --out (by default a run continues them, "
                        "and stops if they come from another model, benchmark file or setting)")
    args = p.parse_args(argv)
    for name in ("n", "max_tokens", "problems_per_batch"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} = {getattr(args, name)}: must be >= 1")
    if args.meta_n < 0:
        raise UserError(f"--meta-n = {args.meta_n}: must be >= 0")
    reference = args.protocol == "reference"
    args.suffix = args.suffix or ("off" if reference else "on")
    args.answer_fallback = args.answer_fallback or ("qwen_math" if reference else "none")
    return args


def eval_config(args: argparse.Namespace, hf_dir: str):
    """The experiment config the planner needs to generate evaluation rollouts."""
    from masa_megatron.config import ExperimentConfig
    cfg = ExperimentConfig()
    cfg.model.hf_path = str(hf_dir)
    cfg.masa.mode = "masa" if args.meta_n > 0 else "grpo"
    cfg.grpo.group_size, cfg.masa.meta_group_size = args.n, max(args.meta_n, 1)
    cfg.masa.parser, cfg.masa.max_source = args.parser, args.max_source
    cfg.masa.notion_rules, cfg.data.solution_suffix = args.notion_rules, args.suffix == "on"
    r = cfg.rollout
    r.temperature, r.top_p, r.seed = args.temperature, args.top_p, args.seed
    r.max_response_length, r.max_prompt_length = args.max_tokens, args.max_prompt_tokens
    return cfg


def problem_record(item, stats, benchmark: str, head_pred=None, notion_rules: str = "spec") -> dict:
    """One results line: outcomes, parsed predictions, notion net counts, gating decision."""
    from masa_megatron.eval import metrics as M
    parsed_rates = [p.get("pass_rate") / 8 if M.is_number(p.get("pass_rate")) else None
                    for p in item.predictions]
    parsed_lengths = [p.get("solution_length") if M.is_number(p.get("solution_length")) else None
                      for p in item.predictions]
    notions = next((p["math_notion"] for p in item.predictions if p.get("math_notion")), None)
    from masa_megatron.masa.scoring import score_metas
    record = {"benchmark": benchmark, "id": item.uid, "scores": stats.scores,
              "lengths": stats.lengths, "predicted_pass_rates": parsed_rates,
              "meta_rewards": [m["score"] for m in score_metas(item, stats, 0.01, notion_rules)],
              "predicted_lengths": parsed_lengths,
              "notion_net": (M.notion_net_counts(notions, item.problem, stats.texts, stats.scores)
                             if notions is not None else None)}
    if head_pred is not None:
        parsed = [r for r in parsed_rates if r is not None]
        text = sum(parsed) / len(parsed) if parsed else None
        record["predicted_pass_rate"] = {"text": text, "head": head_pred[0]}
        record["head_length"] = math.exp(head_pred[1])
    return record


class Evaluator:
    """Rollouts, grades and per-problem records for a list of problems, on a given engine.

    `head_predict(prompt_ids_list) -> [(p, log length)] | None` adds meta-head predictions;
    `answer_fallback` is the grader's (rewards.math). Used by `masa eval` and by the trainer's
    in-loop evaluation (the same prompts, parser, seeds).
    """

    def __init__(self, engine, tokenizer, cfg, head_predict=None, answer_fallback: str = "none"):
        from masa_megatron.masa.planner import RolloutPlanner
        from masa_megatron.masa.policies import resolve_policies
        self.tokenizer, self.head_predict = tokenizer, head_predict
        self.answer_fallback = answer_fallback
        self.planner = RolloutPlanner(cfg, tokenizer, engine, *resolve_policies(cfg.masa))

    def records(self, problems) -> list[dict]:
        """problems: [(benchmark name, eval.benchmarks.Problem)] -> one record each."""
        from masa_megatron.data.prompts import render_solution_prompt
        from masa_megatron.masa.scoring import grade_solutions
        from masa_megatron.rewards.math import grade_batch
        heads = None
        if self.head_predict is not None:
            heads = self.head_predict([render_solution_prompt(
                self.tokenizer, p.problem, self.planner.prompts) for _, p in problems])
        items = self.planner.rollout(0, [(p.id, p.problem, p.answer) for _, p in problems], heads)
        stats = grade_solutions(items, self.tokenizer,
                                lambda r, ref: grade_batch(r, ref, fallback=self.answer_fallback))
        rules = self.planner.cfg.masa.notion_rules
        return [problem_record(it, st, name, heads[i] if heads else None, rules)
                for i, (it, st, (name, _)) in enumerate(zip(items, stats, problems))]


def head_predictor(actor, head):
    """prompt ids -> [(p, log length)] from the actor's last-stage hidden states, on every rank."""
    def predict(prompts):
        hidden = actor.prompt_last_hidden(prompts)
        preds = None if hidden is None else list(zip(*[t.tolist() for t in head(hidden)]))
        return actor.pipeline.broadcast_object(preds)
    return predict


def evaluate(policy, args: argparse.Namespace, *, log=print) -> dict:
    """Generate, grade and record every pending problem; write the report. Returns the report."""
    from masa_megatron.eval.benchmarks import load_benchmarks, parse_field_overrides
    from masa_megatron.eval.report import ResultsStore, write_report
    from masa_megatron.metrics import Progress, is_logging_rank
    from masa_megatron.parallel import broadcast_from_rank0
    from masa_megatron.rollout.embedded import EmbeddedEngine

    model, tokenizer, hf_dir, head = policy
    cfg = eval_config(args, hf_dir)
    engine = EmbeddedEngine.from_config(model, cfg, vocab_size=len(tokenizer),
                                        eos_token_ids=[tokenizer.eos_token_id])
    predict = None
    if head is not None:
        from masa_megatron.config import GRPOConfig
        from masa_megatron.train.actor import Actor
        predict = head_predictor(Actor([model], None, None, GRPOConfig(),
                                       vocab_size=len(tokenizer)), head)
    evaluator = Evaluator(engine, tokenizer, cfg, predict, args.answer_fallback)
    benchmarks = load_benchmarks(
        [b for b in args.benchmarks.split(",") if b], data_dir=args.data_dir, limit=args.limit,
        problem_fields=parse_field_overrides(args.problem_field, "--problem-field"),
        answer_fields=parse_field_overrides(args.answer_field, "--answer-field"))
    out = Path(args.out)
    writer = is_logging_rank()
    refused = None
    if writer:
        from masa_megatron.eval.manifest import build_manifest, claim_output
        try:
            claim_output(out, build_manifest(args, benchmarks), args.restart)
        except UserError as err:
            refused = str(err)
    refused = broadcast_from_rank0(refused)     # every rank stops, not only rank 0
    if refused:
        raise UserError(refused)
    store = ResultsStore(out / "results.jsonl")
    done = store.completed_ids()
    pending = [(b.name, p) for b in benchmarks for p in b.problems if p.id not in done]
    total = sum(len(b.problems) for b in benchmarks)
    if writer:
        skipped = sum(b.n_skipped for b in benchmarks)
        log(f"eval: {total} problems ({len(done)} already done, {skipped} malformed rows skipped)")
    progress = Progress(total, "eval", start=len(done), enabled=writer and not args.no_progress)
    for start in range(0, len(pending), args.problems_per_batch):
        chunk = pending[start:start + args.problems_per_batch]
        records = evaluator.records(chunk)
        if writer:
            store.append_many(records)
        progress.update(progress.step + len(chunk))
    store.close()
    report = {}
    if writer:
        report = write_report(store.records(), out)
        log(f"eval: report in {out}")
    engine.shutdown()
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    from masa_megatron.config import ParallelConfig
    from masa_megatron.lifecycle import output_lock
    from masa_megatron.parallel import destroy_parallel, init_parallel

    args = _parse(argv)
    with output_lock(args.out, "--out"):
        init_parallel(ParallelConfig(tensor_model_parallel_size=args.tp,
                                     pipeline_model_parallel_size=args.pp))
        try:
            evaluate(load_policy(args.model), args)
        finally:
            destroy_parallel()
    return 0

"""Our plain-GRPO step vs TRL's GRPOTrainer on the same work (CPU, fp32, same model and data).

    python benchmarks/grpo_vs_trl.py [--steps 5 --warmup 1 --repeats 3 --problems 4 --group 8
                                      --max-new 64 --threads <cores> --baseline-code DIR]

Both trainers run the same number of RL steps, each in its own subprocess (so peak RSS is
separate; it is read with getrusage in the child), alternating: ours, trl, ours, trl, ...
`--repeats` times. The first `--warmup` steps of every run are not timed. With
`--baseline-code DIR` (a folder holding another version's `masa_megatron` package, e.g. from
`git archive <commit> masa_megatron | tar -x -C DIR`) a third side, "baseline", runs our trainer
from that code in the same rotation (ours, trl, baseline, ...), and the report adds ours/baseline.

The same work on both sides
    model      one tiny Qwen3 HF folder made on the fly (the demo's shape: hidden 128, 4 layers,
               4 heads / 2 KV heads of dim 32, MLP 384, untied; a byte-level BPE tokenizer of
               320 tokens with the Qwen chat template, as the demo makes), random weights
               (`model.tiny.make_tiny_hf_model`), fp32, loaded by each trainer from the folder
               (ours into Megatron, TRL with from_pretrained). With random weights a completion
               rarely stops before the token limit and rewards are ~0; the work per step is
               still the whole pipeline on both sides.
    prompts    the same parquet file of synthetic demo problems, read by the same reader, taken in
               file order (no shuffling on either side): step k trains on problems kP .. kP+P-1.
               The prompt is [user: problem + SOLUTION_SUFFIX] through the tokenizer's chat
               template with the generation prompt, on both sides (TRL renders it itself from
               the conversational `prompt` column; the child checks that the token ids TRL
               hands to `generate` equal ours: `prompt_ids_identical`).
    rollouts   P problems x G samples per step, at most `--max-new` new tokens, temperature 1,
               top_p 1, no top_k, stop at the tokenizer's EOS (counted as a generated token on
               both sides).
    reward     `masa_megatron.rewards.math.grade_batch` on the decoded completions (ours through
               the reward registry's "math", TRL through a reward function that calls it).
    advantage  (r - group mean) / (group std + eps) per group of G (eps 1e-6 ours, 1e-4 TRL).
    old logp   one separate no-grad forward over the whole batch after generation, before the
               update. Ours always does it. TRL skips it when num_iterations == 1 and one
               generation feeds one optimizer step (it then uses logp.detach() as old logp);
               here a GRPOTrainer subclass adds it, calling TRL's own
               `_get_per_token_logps_and_entropies` exactly as TRL's num_iterations > 1 branch
               does, so both sides do the recompute.
    loss       token-level PPO clip with clip-low 0.2 / clip-high 0.28, a dual clip / two-sided
               bound of 10 for negative advantages (ours dual_clip, TRL delta), token-mean over
               the batch (ours token-mean, TRL loss_type="dapo"), no KL (ours kl_coef 0, TRL
               beta 0: no reference model is built on either side), no entropy bonus.
    update     one optimizer step per RL step (ours: 1 mini-batch, 1 PPO epoch; TRL:
               gradient_accumulation_steps 1, steps_per_generation 1, num_iterations 1), AdamW
               betas (0.9, 0.999), eps 1e-8, weight decay 0, constant LR, no warm-up, gradient
               clipping at norm 1, fp32 everywhere (TRL's defaults bf16=True and
               gradient_checkpointing=True are turned off).

What still differs in the work done (by design of each trainer, not by settings)
    generation  ours: the embedded engine on the Megatron model (KV cache; each prompt is
                prefilled once and its cache copied to its G rows; finished rows are dropped from
                the batch). TRL: transformers `generate` (KV cache; each of the P*G rows prefills
                its own copy of the prompt; finished rows keep being computed as padding until
                the longest row ends).
    training    ours: Megatron GPTModel's modules, local layer spec (SDPA attention),
                shared-prefix micro-batches (one here; train/shared_prefix.py: each of the P
                prompts runs once, its G responses attend to it, so the forwards and the update
                compute P x prompt + P x G x response positions, not P x G x (prompt + response)),
                the vocabulary padded to a multiple of 128 (masked), torch AdamW inside
                Megatron's distributed optimizer (DP=1). TRL: transformers Qwen3ForCausalLM with
                SDPA attention, the
                batch right-padded to the longest completion and left-padded to the longest
                prompt, one forward, torch's fused AdamW (transformers' default `optim`) via
                accelerate.
    entropy     each side computes the token entropy once per step, ours in the old-logp
                forward, TRL in the training forward.
    extras      ours: metric totals (accuracy, lengths, token counts) and the ratio check
                (max |ratio - 1| of the first mini-batch, from the training forward it already
                does). TRL: its metrics (clip ratios, entropy, lengths, rewards), per-step
                logging. Per-step logging to the JSONL / TRL's log happens between steps and is
                counted only in the step-to-step interval, not in the in-step time.
    processes   both sides grade in the same grader process pool (forked lazily on the first
                boxed answer; its RSS is not in the peak RSS figure of either side).

Figures (per run, then the median over repeats)
    s/step            median over the timed steps of the interval from the end of one step to
                      the end of the next (includes logging between steps); `in_step_s` is the
                      time inside the step only (ours: run_step; TRL: on_step_begin ->
                      on_step_end, which includes generation, scoring, the recompute, the update).
    tokens/s          generated tokens (completion tokens incl. EOS) / time, over the timed steps.
    generate tokens/s generated tokens / generation time (ours time/generate; TRL `_generate`,
                      which also tokenizes prompts and decodes completions).
    peak RSS          ru_maxrss of the trainer process (imports, model, optimizer, activations).
    CPU time          process CPU seconds per step (all threads); on a loaded machine less
                      sensitive than wall time (see rl_update_overhead.py). With more than one
                      thread it also counts threads spin-waiting for a descheduled sibling, which
                      on a shared machine hits transformers' generate (many small ops per token)
                      much harder than ours: run `--threads 1` too to compare the work itself.
    ratio             ours / trl of the medians (< 1: ours is faster); also the median of the
                      per-repeat ratios, the ratio of the pooled medians, of the fastest steps
                      and of the CPU times.

Prints a summary and writes benchmarks/results/grpo_vs_trl.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_info, machine_label   # benchmarks/, the script's folder

RESULTS = Path(__file__).parent / "results" / "grpo_vs_trl.json"
MODEL_SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   max_position_embeddings=1024)
TOKENIZER_VOCAB = 320
SETTINGS_DOC = {
    "temperature": 1.0, "top_p": 1.0, "top_k": "off", "weight_decay": 0.0,
    "adam_betas": [0.9, 0.999], "adam_eps": 1e-8, "clip_grad": 1.0, "clip_low": 0.2,
    "clip_high": 0.28, "dual_clip": 10.0, "kl": 0.0, "loss": "token-mean (TRL dapo)",
    "schedule": "constant, no warm-up", "dtype": "fp32"}


# ----------------------------------------------------------------------------- set-up
def tokenizer_texts(n: int = 2000) -> list[str]:
    """Texts for the tokenizer: chat markers, the solution suffix, digits and symbols, and
    train-split problems with their worked solutions (the demo's tokenizer corpus without the
    meta prompts and eval problems, which plain GRPO on train problems never renders)."""
    from masa_megatron.data import synthetic
    from masa_megatron.data.prompts import SOLUTION_SUFFIX
    from masa_megatron.demo.warmstart_data import CHAT_MARKERS

    texts = [*CHAT_MARKERS, SOLUTION_SUFFIX, " ".join(synthetic.CONCEPTS),
             "0 1 2 3 4 5 6 7 8 9 - + = { } [ ] , : \" \\boxed{}"]
    return texts + [p["problem"] + "\n" + p["solution"]
                    for p in synthetic.generate_problems(n, 0, "train")]


def make_model(folder: Path) -> Path:
    """A tiny random Qwen3 + the demo's kind of tokenizer (byte-level BPE, Qwen chat template)."""
    import torch

    from masa_megatron.data.tiny_tokenizer import make_tiny_tokenizer
    from masa_megatron.model.tiny import make_tiny_hf_model

    tokenizer = make_tiny_tokenizer(tokenizer_texts(), TOKENIZER_VOCAB)
    make_tiny_hf_model(folder, "qwen3", seed=0, dtype=torch.float32, tied=False,
                       vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **MODEL_SHAPE)
    tokenizer.save_pretrained(str(folder))
    return folder


def make_data(path: Path, n: int) -> Path:
    from masa_megatron.data.synthetic import generate_problems, to_verl_rows, write_rows
    return write_rows(to_verl_rows(generate_problems(n, 0, "train"), "train"), path)


def cpu_pressure() -> float | None:
    """/proc/pressure/cpu 'some avg60' (% of time runnable tasks waited for a CPU), if any."""
    try:
        first = Path("/proc/pressure/cpu").read_text().split("\n")[0]
        return float(dict(kv.split("=") for kv in first.split()[1:])["avg60"])
    except (OSError, KeyError, ValueError):
        return None


def peak_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux


class StepClock:
    """Per-step wall / CPU times: in-step (begin -> end) and end-to-end (end -> next end)."""

    def __init__(self):
        self.begin_wall = self.begin_cpu = None
        self.last_end = None
        self.in_step, self.interval, self.cpu = [], [], []

    def begin(self):
        self.begin_wall, self.begin_cpu = time.perf_counter(), time.process_time()
        if self.last_end is None:  # first step: the interval starts at its beginning
            self.last_end = self.begin_wall

    def end(self):
        now = time.perf_counter()
        self.in_step.append(now - self.begin_wall)
        self.cpu.append(time.process_time() - self.begin_cpu)
        self.interval.append(now - self.last_end)
        self.last_end = now


# ----------------------------------------------------------------------------- children
def child_ours(spec: dict) -> dict:
    """Our trainer, plain GRPO mode, embedded engine: the steps of train.main.run_training (the
    `masa train` entry point: load_config, validate_environment, init_parallel, build_training,
    run_loop), except that the thread count is `--threads` (run_training takes all cores).
    run_step is wrapped (in this process only) to time each step."""
    import torch

    from masa_megatron.config import load_config
    from masa_megatron.config_checks import validate_environment
    from masa_megatron.metrics import read_jsonl
    from masa_megatron.parallel import destroy_parallel, init_parallel
    from masa_megatron.train import loop
    from masa_megatron.train.main import build_training

    clock, tokens = StepClock(), []
    run_step = loop.run_step

    def timed_run_step(parts, step):
        clock.begin()
        metrics = run_step(parts, step)
        clock.end()
        tokens.append(int(metrics["tokens/solution"]))
        return metrics

    loop.run_step = timed_run_step
    s, out = spec["settings"], Path(spec["workdir"])
    overrides = [
        "name=grpo-vs-trl-ours", f"model.hf_path={spec['model']}", "model.dtype=fp32",
        "masa.mode=grpo", f"grpo.group_size={s['group']}", "grpo.clip_low=0.2",
        "grpo.clip_high=0.28", "grpo.dual_clip=10.0", "grpo.loss_agg=token-mean",
        "grpo.kl_coef=0.0", "grpo.ppo_epochs=1", "grpo.mini_batches_per_step=1",
        "grpo.micro_batch_tokens=16384", "grpo.dynamic_sampling=false",
        "rollout.engine=embedded", f"rollout.max_response_length={s['max_new']}",
        "rollout.max_prompt_length=1024", "rollout.temperature=1.0", "rollout.top_p=1.0",
        "rollout.top_k=-1", "rollout.seed=0", f"data.train_files=[{spec['data']}]",
        f"data.prompt_batch_size={s['problems']}", "data.shuffle=false", "data.reward=math",
        "optimizer.name=adam", f"optimizer.lr={s['lr']}", "optimizer.weight_decay=0.0",
        "optimizer.adam_beta1=0.9", "optimizer.adam_beta2=0.999", "optimizer.adam_eps=1e-8",
        "optimizer.clip_grad=1.0", "optimizer.warmup_steps=0", "optimizer.schedule=constant",
        f"trainer.steps={s['warmup'] + s['steps']}", "trainer.eval_every=0",
        f"trainer.output_dir={out}", "checkpoint.save_every=0", "checkpoint.resume=none",
        "logging.jsonl=true", "logging.progress=false"]
    torch.set_num_threads(spec["threads"])
    cfg = load_config(None, overrides)
    validate_environment(cfg, world_size=1)
    init_parallel(cfg.parallel, seed=cfg.model.seed)
    try:
        parts, start = build_training(cfg, log=lambda m: None)
        loop.run_loop(parts, start)
        parts.sinks.close()
        parts.engine.shutdown()
    finally:
        destroy_parallel()
    rows = read_jsonl(out / "metrics.jsonl")
    phases = {}
    for key in ("generate", "score", "logprob", "train", "weight_sync", "step"):
        phases[key] = [r.get(f"time/{key}", 0.0) for r in rows]
    return {"in_step_s": clock.in_step, "interval_s": clock.interval, "cpu_s": clock.cpu,
            "tokens": tokens, "phases_s": phases,
            "accuracy": [r.get("solution/accuracy") for r in rows],
            "threads": torch.get_num_threads(), "peak_rss_bytes": peak_rss_bytes()}


def child_trl(spec: dict) -> dict:
    """TRL's GRPOTrainer with transformers generation, plus the old-log-prob recompute."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from masa_megatron.data.prompts import render_solution_prompt, solution_messages
    from masa_megatron.eval.benchmarks import read_problems
    from masa_megatron.rewards.math import grade_batch

    torch.set_num_threads(spec["threads"])
    s, out = spec["settings"], Path(spec["workdir"])
    P, G = s["problems"], s["group"]
    problems = read_problems(spec["data"]).problems
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    dataset = Dataset.from_list([{"prompt": solution_messages(p.problem), "answer": p.answer}
                                 for p in problems])
    clock, tokens, accuracy, prompt_checks = StepClock(), [], [], []
    phases = {"generate": [], "score": [], "logprob": [], "prepare_inputs": []}

    def math_reward(prompts, completions, completion_ids, answer, **kwargs):
        tokens.append(sum(len(ids) for ids in completion_ids))
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = grade_batch(texts, answer)
        accuracy.append(sum(scores) / len(scores))
        return scores

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name].append(time.perf_counter() - start)
        return wrapper

    class RecomputeOldLogps(GRPOTrainer):
        """Adds the separate old-log-prob forward that TRL itself does when num_iterations > 1
        (same call, same chunking), so that both trainers do the same work."""

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            if "old_per_token_logps" not in output:
                start = time.perf_counter()
                ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
                mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
                with torch.no_grad():
                    logps, _, _ = self._get_per_token_logps_and_entropies(
                        self.model, ids, mask, output["completion_ids"].size(1),
                        batch_size=self.args.per_device_train_batch_size)
                output["old_per_token_logps"] = logps
                phases["logprob"].append(time.perf_counter() - start)
            return output

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.begin()

        def on_step_end(self, args, state, control, **kwargs):
            clock.end()

    config = GRPOConfig(
        output_dir=str(out), seed=0, use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, max_steps=s["warmup"] + s["steps"], per_device_train_batch_size=P * G,
        gradient_accumulation_steps=1, num_generations=G, steps_per_generation=1,
        num_iterations=1, max_completion_length=s["max_new"], temperature=1.0, top_p=1.0,
        top_k=0, shuffle_dataset=False, beta=0.0, epsilon=0.2, epsilon_high=0.28, delta=10.0,
        loss_type="dapo", scale_rewards="group", learning_rate=s["lr"], weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        lr_scheduler_type="constant", warmup_steps=0, log_completions=False,
        dataloader_num_workers=0)
    trainer = RecomputeOldLogps(model=model, reward_funcs=math_reward, args=config,
                                train_dataset=dataset, processing_class=tokenizer,
                                callbacks=[Clock()])
    generate_single = trainer._generate_single_turn

    def check_prompts(prompt_ids, *args, **kwargs):
        step = len(prompt_checks)
        expected = [render_solution_prompt(tokenizer, problems[step * P + i].problem)
                    for i in range(P) for _ in range(G)]
        prompt_checks.append([list(map(int, p)) for p in prompt_ids] == expected)
        return generate_single(prompt_ids, *args, **kwargs)

    trainer._generate_single_turn = check_prompts
    trainer._generate = timed("generate", trainer._generate)
    trainer._calculate_rewards = timed("score", trainer._calculate_rewards)
    trainer._prepare_inputs = timed("prepare_inputs", trainer._prepare_inputs)
    trainer.train()
    phases["train"] = [step - prep for step, prep in zip(clock.in_step, phases["prepare_inputs"])]
    return {"in_step_s": clock.in_step, "interval_s": clock.interval, "cpu_s": clock.cpu,
            "tokens": tokens, "phases_s": phases, "accuracy": accuracy,
            "prompt_ids_identical": all(prompt_checks) and len(prompt_checks) > 0,
            "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                              else trainer.optimizer).__name__,
            "optim": str(getattr(config.optim, "value", config.optim)),
            "threads": torch.get_num_threads(), "peak_rss_bytes": peak_rss_bytes()}


# ----------------------------------------------------------------------------- parent
def run_child(side: str, spec: dict, folder: Path, code: Path | None = None) -> dict:
    """One trainer run in a subprocess; `code`: a folder whose masa_megatron is imported."""
    folder.mkdir(parents=True)
    spec = dict(spec, workdir=str(folder / "run"))
    (folder / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code.resolve()), env.get("PYTHONPATH", "")])
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", "trl" if side == "trl" else "ours",
                           "--spec", str(folder / "spec.json")], env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - started
    result_file = folder / "result.json"
    if proc.returncode != 0 or not result_file.is_file():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{side} run failed (exit {proc.returncode})")
    result = json.loads(result_file.read_text())
    result["process_wall_s"] = wall
    return result


def summarise_run(result: dict, warmup: int) -> dict:
    """Figures of one run over its timed steps (after `warmup` steps)."""
    timed = slice(warmup, None)
    interval, in_step = result["interval_s"][timed], result["in_step_s"][timed]
    tokens = result["tokens"][timed]
    gen = result["phases_s"]["generate"][timed]
    return {
        "s_per_step": statistics.median(interval),
        "in_step_s": statistics.median(in_step),
        "cpu_s_per_step": statistics.median(result["cpu_s"][timed]),
        "tokens_per_step": statistics.mean(tokens),
        "tokens_per_s": sum(tokens) / sum(interval),
        "generate_tokens_per_s": sum(tokens) / sum(gen),
        "phases_s": {k: statistics.median(v[timed]) for k, v in result["phases_s"].items()
                     if len(v) > warmup},
        "peak_rss_mib": result["peak_rss_bytes"] / 2 ** 20,
        "process_wall_s": result["process_wall_s"],
        "first_step_s": result["in_step_s"][0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed RL steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per trainer, alternating")
    parser.add_argument("--problems", type=int, default=4, help="problems per step (P)")
    parser.add_argument("--group", type=int, default=8, help="samples per problem (G)")
    parser.add_argument("--max-new", type=int, default=64, help="max new tokens per sample")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch intra-op threads in both trainers (default: all cores, as "
                             "`masa train` uses)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--baseline-code", type=Path,
                        help="folder with another version's masa_megatron: a third side")
    parser.add_argument("--child", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        spec = json.loads(args.spec.read_text())
        result = (child_ours if args.child == "ours" else child_trl)(spec)
        (args.spec.parent / "result.json").write_text(json.dumps(result))
        return

    settings = dict(steps=args.steps, warmup=args.warmup, problems=args.problems,
                    group=args.group, max_new=args.max_new, lr=args.lr)
    load_before, pressure_before = os.getloadavg(), cpu_pressure()
    started = time.time()
    if args.baseline_code is not None and \
            not (args.baseline_code / "masa_megatron" / "__init__.py").is_file():
        raise SystemExit(f"--baseline-code {args.baseline_code}: no masa_megatron package in it")
    sides = ("ours", "trl") + (("baseline",) if args.baseline_code is not None else ())
    runs = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="grpo_vs_trl-") as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "model")
        data = make_data(tmp / "train.parquet", args.problems * (args.steps + args.warmup))
        spec = {"model": str(model), "data": str(data), "settings": settings,
                "threads": args.threads}
        for repeat in range(args.repeats):
            for side in sides:
                print(f"run {repeat + 1}/{args.repeats}: {side} ...", flush=True)
                result = run_child(side, spec, tmp / f"{side}-{repeat}",
                                   args.baseline_code if side == "baseline" else None)
                runs[side].append(result)
                fig = summarise_run(result, args.warmup)
                print(f"  {fig['s_per_step']:.3f} s/step, {fig['tokens_per_s']:.0f} tokens/s, "
                      f"peak RSS {fig['peak_rss_mib']:.0f} MiB, process {fig['process_wall_s']:.0f} s",
                      flush=True)
        with open(Path(model) / "config.json") as f:
            hf_config = json.load(f)

    from importlib.metadata import version
    per_run = {side: [summarise_run(r, args.warmup) for r in rs] for side, rs in runs.items()}
    pooled = {side: {
        "s_per_step": statistics.median([t for r in rs for t in r["interval_s"][args.warmup:]]),
        "in_step_s": statistics.median([t for r in rs for t in r["in_step_s"][args.warmup:]]),
        "cpu_s_per_step": statistics.median([t for r in rs for t in r["cpu_s"][args.warmup:]]),
        "min_s_per_step": min(t for r in rs for t in r["interval_s"][args.warmup:]),
    } for side, rs in runs.items()}
    median = {side: {key: statistics.median(f[key] for f in figs) for key in
                     ("s_per_step", "in_step_s", "cpu_s_per_step", "tokens_per_step",
                      "tokens_per_s", "generate_tokens_per_s", "peak_rss_mib", "process_wall_s",
                      "first_step_s")}
              for side, figs in per_run.items()}
    for side, figs in per_run.items():
        median[side]["phases_s"] = {k: statistics.median(f["phases_s"][k] for f in figs)
                                    for k in figs[0]["phases_s"]}
    ours, theirs = median["ours"], median["trl"]
    paired = [o["s_per_step"] / t["s_per_step"] for o, t in zip(per_run["ours"], per_run["trl"])]
    notes = [
        "s/step: step end to step end (logging between steps included); in_step excludes it",
        "old log-probs are recomputed by a separate forward on both sides (TRL via a subclass "
        "that calls its own _get_per_token_logps_and_entropies, as its num_iterations>1 path)",
        "beta=0 / kl_coef=0: no reference model on either side; bf16 and gradient "
        "checkpointing off in TRL; one optimizer step per RL step on both sides",
        "generation differs by design: ours prefills each prompt once for its G samples and "
        "drops finished rows; transformers generate prefills every row and keeps finished rows "
        "as padding until the longest ends",
        "training differs by design: ours Megatron local spec, shared-prefix micro-batch (each "
        "prompt computed once for its G samples), vocab padded to a multiple of 128; TRL "
        "transformers SDPA, padded batch (each row repeats its prompt)",
        "tokens = completion tokens incl. EOS; the two sides sample different tokens (different "
        "RNG), so token counts may differ slightly: compare tokens/s as well as s/step",
        "peak RSS: the trainer process only (grader pool processes excluded on both sides)",
        "on a shared machine a run starved by other processes is slower in wall time but not in "
        "CPU time; the CPU-time ratio and the ratio of the fastest steps are less sensitive to "
        "load (CPU time still counts threads spin-waiting for a descheduled sibling)",
    ]
    notes.append("random weights: completions rarely stop before max_new_tokens and rewards "
                     "are ~0 (the work per step is still the full pipeline on both sides)")
    machine = machine_info(threads=runs["ours"][0]["threads"])
    report = {
        "ratio_s_per_step_ours_over_trl": ours["s_per_step"] / theirs["s_per_step"],
        "ratio_in_step_ours_over_trl": ours["in_step_s"] / theirs["in_step_s"],
        "ratio_tokens_per_s_ours_over_trl": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "ratio_generate_tokens_per_s_ours_over_trl":
            ours["generate_tokens_per_s"] / theirs["generate_tokens_per_s"],
        "ratio_peak_rss_ours_over_trl": ours["peak_rss_mib"] / theirs["peak_rss_mib"],
        "ratio_cpu_s_per_step_ours_over_trl": ours["cpu_s_per_step"] / theirs["cpu_s_per_step"],
        "ratio_paired_median": statistics.median(paired),
        "ratio_pooled_s_per_step": pooled["ours"]["s_per_step"] / pooled["trl"]["s_per_step"],
        "ratio_of_minima_s_per_step":
            pooled["ours"]["min_s_per_step"] / pooled["trl"]["min_s_per_step"],
        "median": median,
        "pooled_over_all_timed_steps": pooled,
        "per_run": per_run,
        "raw": {side: [{k: r[k] for k in ("interval_s", "in_step_s", "cpu_s", "tokens",
                                          "phases_s", "accuracy")} for r in rs]
                for side, rs in runs.items()},
        "prompt_ids_identical": all(r["prompt_ids_identical"] for r in runs["trl"]),
        "trl_optimizer": runs["trl"][0]["optimizer"], "trl_optim": runs["trl"][0]["optim"],
        "settings": dict(settings, repeats=args.repeats, order="ours, trl alternating",
                         model_weights="random", **SETTINGS_DOC),
        "model": {k: hf_config.get(k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                "num_hidden_layers", "num_attention_heads",
                                                "num_key_value_heads", "head_dim",
                                                "tie_word_embeddings")},
        "notes": notes,
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "cpu_pressure_some_avg60_pct": {"before": pressure_before, "after": cpu_pressure()},
        "cpus": os.cpu_count(), "threads": runs["ours"][0]["threads"],
        "device": f"cpu ({machine['cpu_model']}), {runs['ours'][0]['threads']} threads",
        "machine_info": machine, "machine_label": machine_label(machine),
        "machine": platform.machine(), "python": platform.python_version(),
        "torch": version("torch"), "megatron_core": version("megatron-core"),
        "transformers": version("transformers"), "trl": version("trl"),
        "total_wall_s": time.time() - started, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python benchmarks/grpo_vs_trl.py " + " ".join(sys.argv[1:]),
    }
    if "baseline" in median:
        base = median["baseline"]
        report["baseline_code"] = str(args.baseline_code)
        report["ratio_s_per_step_ours_over_baseline"] = ours["s_per_step"] / base["s_per_step"]
        report["ratio_paired_median_ours_over_baseline"] = statistics.median(
            o["s_per_step"] / b["s_per_step"] for o, b in zip(per_run["ours"], per_run["baseline"]))
        report["ratio_phases_ours_over_baseline"] = {
            k: ours["phases_s"][k] / v for k, v in base["phases_s"].items() if v > 0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")

    print(f"\nmachine: {report['machine_label']}, load average {machine['load_average']}")
    print(f"{args.problems} problems x {args.group} samples, <= {args.max_new} new tokens, "
          f"{args.steps} timed steps after {args.warmup} per run, {args.repeats} alternating "
          f"repeats; medians over repeats")
    print(f"  {'':8s} {'s/step':>8s} {'in-step':>8s} {'tok/step':>9s} {'tok/s':>7s} "
          f"{'gen tok/s':>9s} {'RSS MiB':>8s}  phases (s)")
    for side in sides:
        m = median[side]
        phases = " ".join(f"{k}={v:.2f}" for k, v in m["phases_s"].items())
        print(f"  {side:8s} {m['s_per_step']:8.3f} {m['in_step_s']:8.3f} "
              f"{m['tokens_per_step']:9.0f} {m['tokens_per_s']:7.0f} "
              f"{m['generate_tokens_per_s']:9.0f} {m['peak_rss_mib']:8.0f}  {phases}")
    print(f"  ratio ours/trl: s/step {report['ratio_s_per_step_ours_over_trl']:.2f} "
          f"(paired {report['ratio_paired_median']:.2f}, pooled "
          f"{report['ratio_pooled_s_per_step']:.2f}, of minima "
          f"{report['ratio_of_minima_s_per_step']:.2f}, CPU time "
          f"{report['ratio_cpu_s_per_step_ours_over_trl']:.2f}), tokens/s "
          f"{report['ratio_tokens_per_s_ours_over_trl']:.2f}, generate tokens/s "
          f"{report['ratio_generate_tokens_per_s_ours_over_trl']:.2f}, peak RSS "
          f"{report['ratio_peak_rss_ours_over_trl']:.2f}")
    if "baseline" in median:
        phases = " ".join(f"{k}={v:.2f}" for k, v in report["ratio_phases_ours_over_baseline"].items())
        print(f"  ratio ours/baseline ({args.baseline_code}): s/step "
              f"{report['ratio_s_per_step_ours_over_baseline']:.2f} (paired "
              f"{report['ratio_paired_median_ours_over_baseline']:.2f}); phases {phases}")
    print(f"  untimed first step: ours {ours['first_step_s']:.1f} s, trl {theirs['first_step_s']:.1f} s;"
          f" whole process (imports, set-up, all steps): ours {ours['process_wall_s']:.0f} s, "
          f"trl {theirs['process_wall_s']:.0f} s")
    print(f"  prompt token ids identical on both sides: {report['prompt_ids_identical']}; "
          f"1-min load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}, CPU pressure "
          f"(avg60 %) {pressure_before} -> {cpu_pressure()}")
    for note in notes:
        print(f"  note: {note}")
    print(f"  wrote {args.out}")


if __name__ == "__main__":
    main()

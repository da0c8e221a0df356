"""The rehearsal's verdicts, from what the probe (probe.py) and the runs left in their folders.

Each check is one `Check(name, status, detail)`; status PASS, FAIL or NOT-WIRED (a mechanism the
code does not perform yet: reported, never faked, and not counted as a failure; see
`handoff_order`).

Hand-off order (colocated recipes; per stand-in server, from its request log): memory tags
released and resumed must follow the cycle
    generate -> release {kv_cache, weights, ...} (training) -> resume {weights}
    -> weight update (KV cache still released) -> resume {kv_cache, ...} -> generate,
i.e. no generation while anything is released, no weight update into released weights or with
the KV cache resident, and between two generation phases (one per RL step) the server gave its
weights and KV cache back at least once. A disaggregated server must see no release at all.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

PASS, FAIL, NOT_WIRED = "PASS", "FAIL", "NOT-WIRED"
GAP_LIMIT = 1e-4
UPDATES = ("/update_weights_from_tensor", "/update_weights_from_distributed",
           "/update_weights_from_disk")
ALL_TAGS = ("kv_cache", "weights", "cuda_graph")


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str

    def line(self) -> str:
        return f"{self.status} {self.name} {self.detail}"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
        if path.is_file() else []


def _verdict(name: str, problems: list[str], ok_detail: str) -> Check:
    if problems:
        return Check(name, FAIL, "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)"
                                                            if len(problems) > 3 else ""))
    return Check(name, PASS, ok_detail)


# ---------------------------------------------------------------- weight sync

def weight_sync_checksums(syncs: list[dict], expected_syncs: int) -> Check:
    """After every sync every server TP rank's full weights hash like the trainer's."""
    problems = []
    for s in syncs:
        served = [h for server in s["servers"] for h in server]
        if s["trainer"] is None:
            problems.append(f"version {s['version']}: synced from disk, no trainer checksum")
        elif not served or any(h != s["trainer"] for h in served):
            bad = sum(h != s["trainer"] for h in served)
            problems.append(f"version {s['version']}: {bad} of {len(served)} served TP ranks "
                            f"differ from the trainer ({s['trainer'][:12]})")
    if len(syncs) < expected_syncs:
        problems.append(f"{len(syncs)} syncs observed, {expected_syncs} expected")
    ranks = max((sum(len(srv) for srv in s["servers"]) for s in syncs), default=0)
    return _verdict("weight_sync_checksum", problems,
                    f"{len(syncs)} syncs (versions {[s['version'] for s in syncs]}), "
                    f"{ranks} served TP ranks each equal the trainer's sha256")


# ---------------------------------------------------------------- log-probs

def _by_step(records: Iterable[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in records:
        out.setdefault(r["step"], []).append(r)
    return out


def logprob_gap(records: list[dict], steps: list[int]) -> Check:
    """max |trainer old log-prob - rollout log-prob| < GAP_LIMIT at every step."""
    by_step, problems, worst = _by_step(records), [], {}
    for step in steps:
        rows = by_step.get(step)
        if not rows:
            problems.append(f"step {step}: no log-probs recorded")
            continue
        if not all(r["has_rollout_logprobs"] for r in rows if r["tokens"]):
            problems.append(f"step {step}: the batch carries no rollout log-probs")
        gap = max(r["max_gap"] for r in rows)
        worst[step] = gap
        if not gap < GAP_LIMIT:    # NaN fails too
            problems.append(f"step {step}: max gap {gap:.3g} >= {GAP_LIMIT:g}")
    shown = ", ".join(f"{s}: {g:.1e}" for s, g in worst.items())
    return _verdict("logprob_gap", problems, f"max |trainer - rollout| per step {{{shown}}} "
                                             f"< {GAP_LIMIT:g}")


def out_of_tokenizer_ids(records: list[dict], step_metrics: dict[int, dict],
                         tokenizer_size: int, model_vocab: int) -> Check:
    """Ids in [tokenizer size, model vocabulary) were sampled and trained on: finite log-probs,
    a finite loss and no skipped optimizer step at the steps that held them."""
    by_step, problems, total = _by_step(records), [], 0
    for step, rows in sorted(by_step.items()):
        oov = sum(r["oov_tokens"] for r in rows)
        if not oov:
            continue
        total += oov
        if not all(r["oov_logprobs_finite"] for r in rows):
            problems.append(f"step {step}: non-finite log-probs at out-of-tokenizer ids")
        metrics = step_metrics.get(step, {})
        loss = metrics.get("train/loss", float("nan"))
        if not math.isfinite(loss) or metrics.get("train/skipped_step", 1):
            problems.append(f"step {step}: loss {loss}, skipped optimizer steps "
                            f"{metrics.get('train/skipped_step')}")
    if not total:
        problems.append(f"no id in [{tokenizer_size}, {model_vocab}) reached a training batch")
    return _verdict("out_of_tokenizer_ids", problems,
                    f"{total} sampled tokens with ids in [{tokenizer_size}, {model_vocab}) "
                    f"trained with finite log-probs and loss")


# ---------------------------------------------------------------- hand-off

def _phases(calls: list[list]) -> list[tuple[str, Optional[tuple]]]:
    """The request log compressed: consecutive /generate -> one ("generate", None)."""
    out: list[tuple[str, Optional[tuple]]] = []
    for path, tags in calls:
        if path == "/generate":
            if not out or out[-1][0] != "generate":
                out.append(("generate", None))
        elif path in ("/release_memory_occupation", "/resume_memory_occupation"):
            out.append((path.strip("/").split("_")[0], tuple(tags or ALL_TAGS)))
        elif path in UPDATES:
            if not out or out[-1][0] != "update":
                out.append(("update", None))
    return out


def handoff_problems(calls: list[list], colocated: bool) -> tuple[list[str], bool]:
    """(violations of the cycle in the module docstring, whether any release was seen)."""
    phases, problems = _phases(calls), []
    released: set[str] = set()
    handed_over = True            # before the first generation nothing is owed
    generations, any_release = 0, False
    for i, (kind, tags) in enumerate(phases):
        if kind == "release":
            any_release = True
            released |= set(tags)
            if {"kv_cache", "weights"} <= released:
                handed_over = True
        elif kind == "resume":
            released -= set(tags)
        elif kind == "update":
            if "weights" in released:
                problems.append(f"call {i}: weight update into released weights")
            elif colocated and "kv_cache" not in released:
                problems.append(f"call {i}: weight update while the KV cache is resident")
        elif kind == "generate":
            if released:
                problems.append(f"call {i}: generate while {sorted(released)} released")
            if colocated and not handed_over:
                problems.append(f"call {i}: generation phase {generations + 1} without the "
                                f"weights and KV cache released since the previous one")
            generations += 1
            handed_over = False
    if not colocated and any_release:
        problems.append("a disaggregated server was asked to release memory")
    return problems, any_release


def handoff_order(server_logs: list[dict], colocated: bool) -> Check:
    name = "handoff_order"
    if not server_logs:
        return Check(name, FAIL, "no stand-in request log was saved (did the run end early?)")
    problems, releases = [], 0
    for i, log in enumerate(server_logs):
        if not log.get("recorded"):
            problems.append(f"log {i}: no request log ({log.get('error') or 'not recorded'})")
            continue
        found, released = handoff_problems(log["calls"], colocated)
        releases += released
        problems += [f"log {i}: {p}" for p in found]
    sequence = " ".join(k if t is None else f"{k}{list(t)}" for k, t in
                        _phases(server_logs[0].get("calls", []))[:8])
    recorded = all(log.get("recorded") for log in server_logs)
    if colocated and recorded and not releases:    # every problem follows from that
        return Check(name, NOT_WIRED, f"not wired yet: colocated, but no server was ever asked "
                                      f"to release memory (the first log: {sequence} ...)")
    return _verdict(name, problems, f"{len(server_logs)} server logs; the first: {sequence} ...")


# ---------------------------------------------------------------- layout

def sequence_parallel_layers(linear: list[dict], sp: bool, tp: int) -> Check:
    """With SP every TP linear layer runs sequence-parallel and sees a full sequence length
    divisible by TP (column-parallel inputs are the 1/TP shard)."""
    problems, lengths = [], set()
    if not linear:
        return Check("sequence_parallel_layers", FAIL, "no linear layer input was recorded")
    for rank_record in linear:
        for key, seen in rank_record.items():
            kind, on, shard = key.split("|")
            for s in seen:
                full = s * tp if shard == "in_sp=True" else s
                lengths.add(full)
                if sp and on != "sp=True":
                    problems.append(f"{kind} runs without sequence parallelism "
                                    f"(parallel.sequence_parallel=true)")
                if sp and full % tp:
                    problems.append(f"{kind}: sequence length {full} not divisible by TP {tp}")
    problems = sorted(set(problems))
    what = f"TP {tp}, sequence parallel" if sp else f"TP {tp}, no sequence parallelism"
    return _verdict("sequence_parallel_layers", problems,
                    f"{what}; full sequence lengths seen {sorted(lengths)[:6]}")


# ---------------------------------------------------------------- checkpoint, resume, export

def resumed_from(step_metrics_order: list[int], steps: int, ckpt_root: Path) -> Check:
    """Run 1 did steps 0..N-1 and saved step N; run 2 resumed there and did step N only."""
    problems = []
    if step_metrics_order != list(range(steps + 1)):
        problems.append(f"steps run {step_metrics_order}, expected {list(range(steps + 1))} "
                        f"(the resumed run must start at step {steps})")
    for step in (steps, steps + 1):
        folder = ckpt_root / f"step_{step:06d}"
        if not (folder / "model").is_dir():
            problems.append(f"no complete checkpoint {folder}")
    return _verdict("checkpoint_resume", problems, f"steps {step_metrics_order}; checkpoints at "
                                                   f"{steps} and {steps + 1}")


def exported(code: Optional[int], export: Path, syncs: list[dict], ckpt: Path) -> Check:
    """`masa convert mcore2hf` of the last checkpoint gives the weights the servers got last."""
    if code is None:
        return Check("export_hf", FAIL, f"no checkpoint {ckpt} to export")
    if code:
        return Check("export_hf", FAIL, f"masa convert mcore2hf exited with {code}")
    from tests.sglang_standin.weights import hf_checksum, load_hf_folder

    digest = hf_checksum(load_hf_folder(str(export)))
    last = syncs[-1]["trainer"] if syncs else None
    if digest != last:
        return Check("export_hf", FAIL, f"exported weights {digest[:12]} differ from the last "
                                        f"synced ones {str(last)[:12]}")
    return Check("export_hf", PASS, f"{export}: sha256 {digest[:12]} = the last synced weights")

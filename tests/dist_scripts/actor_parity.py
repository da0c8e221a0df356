"""Actor checks for one parallel layout, launched with torchrun (see tests/test_actor_parallel.py).

    ref     (1 process): the single-process, single-micro-batch reference. Saves the initial
            weights, log-probs, prompt hidden states, update metrics and updated weights; checks
            log-probs against a plain full-vocabulary log_softmax, the ratio invariant (fires on
            perturbed old log-probs, holds on recomputed ones), the NaN skip and sft_step.
    layouts (2 processes): TP=2, then DP=2, then PP=2, then TP=2 with sequence parallelism and
            full activation recomputation (parallel state re-initialised in between).
            Each loads the initial weights, takes this DP rank's groups (uneven tokens), uses a
            small micro-batch budget (several micro-batches of different shapes), and compares
            log-probs, hidden states, loss and updated weights (SGD and Adam) with the reference;
            checks that every linear layer's input holds a sequence the layout can split
            (model/shape_check.py: TP with SP); checks the NaN skip; repeats the update with
            a prompt-state loss (the joint meta-head term, some rows without targets) against
            the reference; TP=2 and DP=2 save checkpoints, which PP=2 resumes from (Adam
            moments included), and each resumes from its own.
Writes <out>/<name>_rank<r>.json with the measured differences; raises on a failed check.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from masa_megatron.model.shape_check import LinearShapeCheck  # noqa: E402
from masa_megatron.train.batching import plan_micro_batches  # noqa: E402

from actor_common import (ADAM, VOCAB, check, load_model, make_batch,  # noqa: E402
                          max_abs_diff, model_state, rank, save_model, setup_actor)

TOL_LOGP = 1e-5
TOL_WEIGHTS = 1e-6
TOL_LOSS = 1e-6
DP_REFERENCE, MINI_BATCHES = 2, 2


def global_order():
    """The batch ordered so that the single-process mini-batches are the union, over DP ranks,
    of each rank's mini-batches; and each DP rank's indices into it."""
    from masa_megatron.train.batching import split_for_data_parallel, split_mini_batches

    batch = make_batch()
    ranks = split_for_data_parallel(batch, batch.group_ids, DP_REFERENCE)
    chunks = [split_mini_batches(len(r), MINI_BATCHES) for r in ranks]
    order, local = [], [[] for _ in ranks]
    for k in range(MINI_BATCHES):
        for r, indices in enumerate(ranks):
            for j in chunks[r][k]:
                local[r].append(len(order))
                order.append(indices[j])
    check(all(len(r) % MINI_BATCHES == 0 for r in ranks), "uneven mini-batch split")
    return batch.subset(order), local


def plain_logprobs(actor, batch, temperature):
    """Full-vocabulary log_softmax of an unpadded forward per sample (no Megatron CE)."""
    from masa_megatron.train.actor import unwrap_model

    gpt, out = unwrap_model(actor.model_chunks[0]), []
    with torch.no_grad():
        for prompt, response in zip(batch.prompt_ids, batch.response_ids):
            seq = torch.tensor(prompt + response)
            x = seq[:-1].unsqueeze(0)
            logits = gpt(x, torch.arange(x.shape[1]).unsqueeze(0), None)[0, :, :VOCAB]
            logp = torch.log_softmax(logits.float() / temperature, dim=-1)
            out.append(logp[len(prompt) - 1:].gather(-1, seq[len(prompt):, None]).squeeze(-1))
    return out


def plain_last_hidden(actor, prompts):
    """Output of decoder.final_layernorm at the last prompt token (forward hook, no padding)."""
    from masa_megatron.train.actor import unwrap_model

    gpt, seen = unwrap_model(actor.model_chunks[0]), []
    hook = gpt.decoder.final_layernorm.register_forward_hook(lambda m, a, o: seen.append(o))
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor(p).unsqueeze(0)
            gpt(x, torch.arange(x.shape[1]).unsqueeze(0), None)
    hook.remove()
    return torch.stack([h[-1, 0] for h in seen])


def joint_head_update(out: Path, tp: int, pp: int, budget: int, mine: list[int],
                      reference: bool, **model) -> dict:
    """SGD update from the initial weights with the joint meta-head term (a fixed head,
    w = 0.5, NaN targets on some rows): loss and weights must equal the single process's."""
    import math

    from masa_megatron.masa.meta_head import JointHeadLoss, MetaHead

    actor, _ = setup_actor(tp, pp, mini_batches=MINI_BATCHES, micro_batch_tokens=budget, **model)
    load_model(actor, out / "init")
    head = MetaHead(actor.model_config.hidden_size)
    gen = torch.Generator().manual_seed(0)
    for linear in (head.pass_rate, head.log_length):
        linear.weight.data = 0.3 * torch.randn(linear.weight.shape, generator=gen)
    actor.prompt_state_loss = JointHeadLoss(head, 0.5)
    batch = global_order()[0]
    nan = float("nan")
    batch.prompt_targets = torch.tensor([[nan if i % 4 == 3 else (i % 5) / 4,
                                          nan if i % 3 == 0 else math.log(5 + i)]
                                         for i in range(len(batch))])
    batch = batch.subset(mine)
    batch.old_logprobs = actor.logprobs(batch)
    metrics = actor.update(batch)
    result = {"joint_loss": metrics["train/loss"],
              "joint_term": metrics["train/prompt_state_loss"]}
    check(result["joint_term"] > 0, f"no prompt-state loss: {metrics}")
    if reference:
        save_model(actor, out / "final_joint")
        return result
    ref = json.loads((out / "ref_rank0.json").read_text())
    updated = model_state(actor)
    load_model(actor, out / "final_joint")
    result = {"joint_loss_vs_ref": max(abs(result[k] - ref[k]) / max(1.0, abs(ref[k]))
                                       for k in result),  # relative: the term is O(1)
              "joint_weights_vs_ref": max_abs_diff(updated, model_state(actor))}
    check(result["joint_loss_vs_ref"] <= TOL_LOSS and result["joint_weights_vs_ref"] <= TOL_WEIGHTS,
          f"joint meta-head update differs from the reference: {result}")
    return result


def nan_step_is_skipped(actor, batch) -> dict:
    bad = batch.subset(range(len(batch)))
    bad.advantages[0] = bad.advantages[-1] = float("nan")  # first and last mini-batch
    before = model_state(actor)
    metrics = actor.update(bad)
    check(metrics["train/skipped_step"] == MINI_BATCHES, f"NaN loss was not skipped: {metrics}")
    diff = max_abs_diff(before, model_state(actor))
    check(diff == 0.0, f"weights changed by {diff} in a skipped step")
    return {"nan_skipped_steps": metrics["train/skipped_step"]}


def run_reference(out: Path) -> dict:
    from masa_megatron.train.actor import RatioInvariantError

    actor, _ = setup_actor(1, 1, mini_batches=MINI_BATCHES)
    save_model(actor, out / "init")
    batch, _ = global_order()
    logp, entropy = actor.logprobs(batch, with_entropy=True)
    plain = plain_logprobs(actor, batch, actor.temperature)
    err_plain = max((a - b).abs().max().item() for a, b in zip(logp, plain))
    check(err_plain <= TOL_LOGP, f"log-probs vs plain log_softmax differ by {err_plain}")
    check(all(bool((e > 0).all()) for e in entropy), "entropy not positive")
    hidden = actor.prompt_last_hidden(batch.prompt_ids)
    err_hidden = (hidden - plain_last_hidden(actor, batch.prompt_ids)).abs().max().item()
    check(err_hidden <= TOL_LOGP, f"prompt_last_hidden differs from the plain hook by {err_hidden}")
    torch.save({"logprobs": logp, "hidden": hidden}, out / "ref_outputs.pt")

    batch.old_logprobs = [x.clone() for x in logp]
    perturbed = batch.subset(range(len(batch)))
    perturbed.old_logprobs = [x.clone() for x in logp]
    perturbed.old_logprobs[3][0] += 1e-3
    before = model_state(actor)
    try:
        actor.update(perturbed, check_ratio=True)
        check(False, "RatioInvariantError not raised on perturbed old log-probs")
    except RatioInvariantError as err:
        check("= 9.99" in str(err) and "exceeds" in str(err), f"message lacks the value: {err}")
    check(max_abs_diff(before, model_state(actor)) == 0.0, "weights changed after the ratio error")

    metrics = actor.update(batch, check_ratio=True)
    check(metrics["train/step0_ratio_dev_max"] < 1e-5, f"ratio invariant: {metrics}")
    check(metrics["train/skipped_step"] == 0, f"unexpected skip: {metrics}")
    save_model(actor, out / "final")
    result = {"logprob_vs_plain": err_plain, "hidden_vs_plain": err_hidden,
              "step0_ratio_dev_max": metrics["train/step0_ratio_dev_max"], **metrics}
    result.update(nan_step_is_skipped(actor, batch))

    pairs = (batch.prompt_ids[:6], batch.response_ids[:6])
    nll = [actor.sft_step(*pairs, lr=0.2)["sft/nll"] for _ in range(4)]
    check(nll[-1] < nll[0] - 0.1, f"sft_step did not lower the NLL: {nll}")
    result["sft_nll"] = nll

    adam, _ = setup_actor(1, 1, opt_cfg=ADAM, mini_batches=MINI_BATCHES)
    load_model(adam, out / "init")
    batch.old_logprobs = adam.logprobs(batch)
    result["adam_loss"] = adam.update(batch)["train/loss"]
    save_model(adam, out / "final_adam")
    result.update(joint_head_update(out, 1, 1, 1 << 20, list(range(len(batch))), reference=True))
    return result


def run_layout(out: Path, tp: int, pp: int, budget: int, save: bool,
               load_from: list[str], **model) -> dict:
    """`model`: setup_actor's sp / model_overrides."""
    actor, layout = setup_actor(tp, pp, mini_batches=MINI_BATCHES, micro_batch_tokens=budget,
                                **model)
    name = f"tp{tp}{'sp' if model.get('sp') else ''}_pp{pp}_dp{layout.dp_size}"
    config = actor.model_config
    check(config.sequence_parallel == bool(model.get("sp")), "sequence_parallel not applied")
    recompute = (model.get("model_overrides") or {}).get("recompute", "none")
    check((config.recompute_granularity or "none") == recompute, "recompute not applied")
    load_model(actor, out / "init")
    ordered, local = global_order()
    mine = local[layout.dp_rank] if layout.dp_size > 1 else list(range(len(ordered)))
    batch = ordered.subset(mine)
    ref = torch.load(out / "ref_outputs.pt")
    first = range(len(batch) // 2)
    lengths = batch.row_lengths()
    result = {"layout": name, "local_samples": len(batch),
              "local_response_tokens": batch.response_token_count(),
              "micro_batches_first_mini": len(actor._micro_batches(batch, first)),
              "sequence_multiple": actor.sequence_multiple,
              "unpadded_widths_first_mini": [max(lengths[i] for i in group) for group in
                                             plan_micro_batches([lengths[i] for i in first],
                                                                budget, actor.sequence_multiple)]}
    check(result["micro_batches_first_mini"] > 1, "budget too large: a single micro-batch")
    # every linear layer's input must hold a sequence the layout can split (model/shape_check.py)
    shapes = LinearShapeCheck.for_config(actor.model_chunks, config)

    logp = actor.logprobs(batch)
    result["logprob_vs_ref"] = max((a - ref["logprobs"][i]).abs().max().item()
                                   for a, i in zip(logp, mine))
    check(result["logprob_vs_ref"] <= TOL_LOGP, f"log-probs vs TP1: {result['logprob_vs_ref']}")
    hidden = actor.prompt_last_hidden(batch.prompt_ids)
    if layout.is_last_stage:
        result["hidden_vs_ref"] = (hidden - ref["hidden"][mine]).abs().max().item()
        check(result["hidden_vs_ref"] <= TOL_LOGP, f"hidden vs TP1: {result['hidden_vs_ref']}")
    else:
        check(hidden is None, "prompt_last_hidden returned a value on a non-last stage")

    batch.old_logprobs = logp
    metrics = actor.update(batch, check_ratio=True)
    reference = json.loads((out / "ref_rank0.json").read_text())
    result["loss_vs_ref"] = abs(metrics["train/loss"] - reference["train/loss"])
    result["grad_norm_vs_ref"] = abs(metrics["train/grad_norm"] - reference["train/grad_norm"])
    check(metrics["train/token_count"] == reference["train/token_count"],
          f"token count {metrics['train/token_count']} != {reference['train/token_count']}")
    check(result["loss_vs_ref"] <= TOL_LOSS, f"loss differs from the reference: {result}")
    shapes.remove()
    result["linear_inputs_checked"] = shapes.calls
    check(shapes.calls > 0, "no linear layer input was checked")
    if save:
        actor.save_checkpoint(out / f"ckpt_{name}_sgd")
    updated = model_state(actor)
    load_model(actor, out / "final")
    result["weights_vs_ref"] = max_abs_diff(updated, model_state(actor))
    check(result["weights_vs_ref"] <= TOL_WEIGHTS, f"updated weights differ: {result}")
    result.update(nan_step_is_skipped(actor, batch))
    result.update(joint_head_update(out, tp, pp, budget, mine, reference=False, **model))
    for other in load_from:
        actor.load_checkpoint(out / f"ckpt_{other}_sgd")
        restored = model_state(actor)
        load_model(actor, out / "final")
        result[f"sgd_from_{other}_weights"] = max_abs_diff(restored, model_state(actor))
        check(result[f"sgd_from_{other}_weights"] <= TOL_WEIGHTS, f"checkpoint weights: {result}")
        check(actor.scheduler.num_steps == MINI_BATCHES, "scheduler state not restored")
    if save or load_from:
        result.update(adam_checkpoints(out, tp, pp, name, mine, budget, save, load_from))
    return result


def adam_checkpoints(out: Path, tp: int, pp: int, name: str, mine: list[int], budget: int,
                     save: bool, load_from: list[str]) -> dict:
    """Adam (the distributed optimizer when DP > 1) vs single-process Adam; checkpoint resume in
    this layout and from another layout's checkpoint: resuming and repeating the same update
    must give the same weights, which needs the restored Adam moments and step."""
    adam, layout = setup_actor(tp, pp, opt_cfg=ADAM, mini_batches=MINI_BATCHES,
                               micro_batch_tokens=budget)
    distributed = adam.model_chunks[0].ddp_config.use_distributed_optimizer
    check(distributed, "adam with parallel.use_distributed_optimizer: distributed optimizer")
    load_model(adam, out / "init")
    batch = global_order()[0].subset(mine)
    batch.old_logprobs = adam.logprobs(batch)
    reference = json.loads((out / "ref_rank0.json").read_text())
    result = {"adam_loss_vs_ref": abs(adam.update(batch)["train/loss"] - reference["adam_loss"]),
              "distributed_optimizer": distributed}
    check(result["adam_loss_vs_ref"] <= TOL_LOSS, f"adam loss: {result}")
    updated = model_state(adam)
    load_model(adam, out / "final_adam")
    result["adam_weights_vs_ref"] = max_abs_diff(updated, model_state(adam))
    check(result["adam_weights_vs_ref"] <= TOL_WEIGHTS, f"adam weights: {result}")

    ckpt = out / f"ckpt_{name}_adam"
    adam.save_checkpoint(ckpt)
    adam.update(batch)
    continued = model_state(adam)
    if save:
        save_model(adam, out / f"continued_{name}_adam")
    adam.load_checkpoint(ckpt)
    result["adam_resume_weights"] = max_abs_diff(updated, model_state(adam))
    adam.update(batch)
    result["adam_resume_vs_continued"] = max_abs_diff(continued, model_state(adam))
    check(result["adam_resume_weights"] <= TOL_WEIGHTS and
          result["adam_resume_vs_continued"] <= TOL_WEIGHTS, f"adam resume: {result}")
    check(adam.scheduler.num_steps == 2 * MINI_BATCHES, "scheduler steps after resume")
    for other in load_from:
        try:
            adam.load_checkpoint(out / f"ckpt_{other}_sgd")
            check(False, "a regular-optimizer checkpoint loaded into the distributed optimizer")
        except ValueError as err:
            check("parallel.use_distributed_optimizer=false" in str(err), str(err))
        adam.load_checkpoint(out / f"ckpt_{other}_adam")
        weights = max_abs_diff(updated, model_state(adam))
        adam.update(batch)
        resumed = model_state(adam)
        load_model(adam, out / f"continued_{other}_adam")
        result[f"adam_from_{other}"] = max(weights, max_abs_diff(resumed, model_state(adam)))
        check(result[f"adam_from_{other}"] <= TOL_WEIGHTS, f"adam reshard: {result}")
    return result


# (tp, pp, save checkpoints, load the checkpoints of[, setup_actor's sp / model_overrides])
# -- run in this order in one launch
LAYOUTS = {
    "tp2_pp1_dp1": (2, 1, True, []),
    "tp1_pp1_dp2": (1, 1, True, []),
    "tp1_pp2_dp1": (1, 2, False, ["tp2_pp1_dp1", "tp1_pp1_dp2"]),
    "tp2sp_pp1_dp1": (2, 1, False, [], dict(sp=True, model_overrides=dict(
        recompute="full", recompute_method="uniform", recompute_num_layers=2))),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["ref", "layouts"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=int, default=120, help="micro_batch_tokens")
    parser.add_argument("--only", nargs="*", default=list(LAYOUTS), choices=list(LAYOUTS))
    args = parser.parse_args()
    results = {"ref": run_reference(args.out)} if args.mode == "ref" else {
        name: run_layout(args.out, *LAYOUTS[name][:2], args.budget, *LAYOUTS[name][2:4],
                         **(LAYOUTS[name][4] if len(LAYOUTS[name]) > 4 else {}))
        for name in args.only}
    for name, result in results.items():
        (args.out / f"{name}_rank{rank()}.json").write_text(json.dumps(result, indent=1))
    torch.distributed.barrier()
    print(f"rank {rank()} OK {json.dumps(results)}", flush=True)


if __name__ == "__main__":
    main()

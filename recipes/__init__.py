"""Registered training recipes: plain functions returning an `ExperimentConfig`.

    from recipes import get_recipe, list_recipes
    cfg = get_recipe("qwen3_8b_masa_efficient_1n8g")     # a fresh ExperimentConfig

Names: `qwen3_<size>_<method>[_paper]_<scale>[_fp8]` (recipes/qwen3.py) and `tiny_cpu_<method>`
(recipes/tiny.py). `masa recipes` prints the table with layouts and memory estimates. Recipes are
starting points: override any field with `key=value` (`masa train --recipe NAME key=value ...`).
"""
from __future__ import annotations

import difflib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from masa_megatron.config import ExperimentConfig
from masa_megatron.errors import UserError
from masa_megatron.memory_estimator import ModelArch, estimate
from recipes.qwen3 import ARCHS, GPUS_PER_NODE, LAYOUTS, qwen3_recipe, qwen3_recipes
from recipes.tiny import TINY_WORLD_SIZE, tiny_cpu_recipe, tiny_recipes


@dataclass(frozen=True)
class RecipeInfo:
    """A registered recipe: how to build it and where it runs."""
    name: str
    factory: Callable[[], ExperimentConfig]
    arch: ModelArch | None        # None: the model comes from the caller (tiny CPU recipes)
    train_nodes: int
    rollout_nodes: int
    gpus_per_node: int               # 0: CPU processes

    @property
    def procs_per_node(self) -> int:
        """torchrun processes per training node."""
        return self.gpus_per_node or TINY_WORLD_SIZE

    def build(self) -> ExperimentConfig:
        return self.factory()


def _build_registry() -> dict[str, RecipeInfo]:
    registry = {}
    for name, (args, arch, layout) in qwen3_recipes().items():
        registry[name] = RecipeInfo(name, lambda a=args: qwen3_recipe(*a), arch,
                                    layout.train_nodes, layout.rollout_nodes, GPUS_PER_NODE)
    for name, args in tiny_recipes().items():
        registry[name] = RecipeInfo(name, lambda a=args: tiny_cpu_recipe(*a), None, 1, 0, 0)
    return registry


_REGISTRY = _build_registry()


def list_recipes() -> list[str]:
    return sorted(_REGISTRY)


def get_recipe_info(name: str) -> RecipeInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown recipe '{name}'{hint}; `masa recipes` lists them") from None


def get_recipe(name: str) -> ExperimentConfig:
    """A fresh config for the registered recipe `name`; UserError (with a hint) if unknown."""
    return get_recipe_info(name).build()


def _layout_cells(info: RecipeInfo, cfg: ExperimentConfig) -> list[str]:
    p, r = cfg.parallel, cfg.rollout
    mp = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    dp = (p.world_size or mp) // mp
    if r.engine != "sglang":
        rollout = r.engine
    elif r.colocate:
        rollout = f"sglang coloc {r.sglang_num_servers}xTP{r.sglang_tp}"
    else:
        rollout = f"sglang {info.rollout_nodes}n {r.sglang_num_servers}xTP{r.sglang_tp}"
    est = estimate(cfg, info.arch) if info.arch else None
    total, peak = (f"{est.total:.1f}", f"{est.peak_phase}: {est.dominant}") if est else ("cpu", "")
    nodes = f"{info.train_nodes}+{info.rollout_nodes}" if info.rollout_nodes else \
        str(info.train_nodes)
    return [info.name, cfg.masa.mode, "fp8" if cfg.model.fp8 else cfg.model.dtype, nodes,
            f"{p.tensor_model_parallel_size}/{p.pipeline_model_parallel_size}/{dp}", rollout,
            str(cfg.grpo.micro_batch_tokens), "yes" if r.offload_train_state else "no", total, peak]


def recipe_table() -> str:
    """Every recipe with its layout and the estimated GiB per GPU (of 80)."""
    header = ["recipe", "method", "precision", "nodes", "TP/PP/DP", "rollout", "mb tokens",
              "offload", "GiB/GPU", "peak phase"]
    rows = [header] + [_layout_cells(_REGISTRY[n], _REGISTRY[n].build()) for n in list_recipes()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in rows)


def markdown_recipe_table() -> str:
    """docs/launching.md's table: one row per Qwen3 size, the largest peak over its recipes
    (bf16 / fp8), the peak phase and what dominates it, and what was raised to fit."""
    rows = ["| size | nodes | training TP/PP/DP | SGLang | micro-batch tokens | recompute | "
            "offload | GiB/GPU (bf16 / fp8) | peak phase: largest part | raised to fit |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for size, layout in LAYOUTS.items():
        names = [n for n in list_recipes() if n.startswith(f"qwen3_{size}_")]
        ests = {n: estimate(get_recipe(n), _REGISTRY[n].arch) for n in names}
        bf16 = max((n for n in names if not n.endswith("_fp8")), key=lambda n: ests[n].total)
        fp8 = max((n for n in names if n.endswith("_fp8")), key=lambda n: ests[n].total)
        cfg, est = get_recipe(bf16), ests[bf16]
        p = cfg.parallel
        dp = p.world_size // (layout.tp * layout.pp)
        nodes = (f"{layout.train_nodes} train + {layout.rollout_nodes} rollout"
                 if layout.rollout_nodes else str(layout.train_nodes))
        sglang = (f"colocated, {layout.sglang_num_servers} x TP{layout.sglang_tp}"
                  if layout.colocate else
                  f"own node, {layout.sglang_num_servers} x TP{layout.sglang_tp}, router")
        recompute = cfg.model.recompute + (f" {cfg.model.recompute_method} "
                                           f"{cfg.model.recompute_num_layers}"
                                           if cfg.model.recompute == "full" else "")
        rows.append(
            f"| {ARCHS[size].name.split('-')[1]} | {nodes} | {layout.tp}/{layout.pp}/{dp} | "
            f"{sglang}, mem_fraction {layout.sglang_mem_fraction} | "
            f"{layout.micro_batch_tokens:,} | {recompute} | "
            f"{'yes' if layout.offload_train_state else 'no'} | "
            f"{est.total:.1f} / {ests[fp8].total:.1f} | {est.peak_phase}: {est.dominant} | "
            f"{layout.memory_change or '-'} |")
    return "\n".join(rows)


def print_recipe_table(file: TextIO = sys.stdout, markdown: bool = False) -> None:
    print(markdown_recipe_table() if markdown else recipe_table(), file=file)


__all__ = ["RecipeInfo", "get_recipe", "get_recipe_info", "list_recipes", "markdown_recipe_table",
           "print_recipe_table", "recipe_table"]

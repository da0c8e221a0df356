"""Experiment configuration: one dataclass per component, composed into `ExperimentConfig`.

Loaded with OmegaConf structured configs (types are enforced on merge), overridden with dotted
`a.b=c` strings, and checked by `config_checks.validate_static` as it loads.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from masa_megatron.config_checks import ConfigError, validate_static
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


@dataclass
class ModelConfig:
    """The policy: a Hugging Face checkpoint folder (or config-only folder for random init)."""
    hf_path: str = MISSING
    dtype: str = "fp32"                    # fp32 | bf16 | fp16 (params/compute; master weights fp32)
    layer_spec: str = "auto"               # auto (te when installed and CUDA, else local) | local | te
    make_vocab_size_divisible_by: int = 128
    fp8: Optional[str] = None              # None | hybrid | e4m3
    fp8_recipe: str = "delayed"            # delayed | tensorwise | blockwise | mxfp8
    fp8_param: bool = False
    recompute: str = "none"                # none | selective (core attention) | full (layers)
    recompute_method: str = "uniform"      # full: uniform (groups of n layers) | block (first n)
    recompute_num_layers: int = 1          # full: the n of recompute_method (uniform: divides L/PP)
    random_init: bool = False              # build from config.json only, no weights (tests/demo)
    seed: int = 1234


@dataclass
class ParallelConfig:
    """Megatron layout. DP is derived: world_size / (TP * PP * CP)."""
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True   # Adam: at any DP, so checkpoints reshard across DP
    world_size: Optional[int] = None         # None: taken from the launcher (WORLD_SIZE)


@dataclass
class RolloutConfig:
    """Generation: which engine, and the sampling parameters of solution and meta rollouts."""
    engine: str = "embedded"               # embedded | sglang | a registered/dotted engine name
    max_prompt_length: int = 2048
    max_response_length: int = 8192
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int = 0
    # embedded engine on CUDA, TP = PP = 1: decode steps replayed from CUDA graphs captured per
    # batch-size bucket (1, 2, 4, ... up to cuda_graph_max_batch); larger batches run the same
    # static-shape step uncaptured. Refused (at engine start) without CUDA and for MoE models.
    cuda_graphs: bool = False
    cuda_graph_max_batch: int = 64
    # SGLang only
    sglang_urls: list[str] = field(default_factory=list)   # attach; empty: launch servers
    sglang_num_servers: int = 1
    sglang_tp: int = 1
    sglang_mem_fraction: float = 0.7
    sglang_host: str = "127.0.0.1"
    sglang_base_port: int = 30000
    sglang_router: bool = False            # generation through an sglang-router
    # a running router (disaggregated: the one slurm/disaggregated.sbatch starts); "" = the
    # trainer starts one, only in front of servers it launched itself
    sglang_router_url: str = ""
    sglang_concurrency: int = 256          # in flight per sender through a router
    # sequences each server runs at once, shared by the senders; 0 = what /get_server_info says
    sglang_max_running_requests: int = 0
    sglang_health_timeout_s: float = 600.0
    sglang_request_timeout_s: float = 3600.0
    sglang_max_retries: int = 3
    sglang_retry_backoff_s: float = 1.0
    sglang_deterministic: bool = False     # --enable-deterministic-inference (seeded sampling)
    sglang_python: str = ""                # interpreter of the servers and router ("" = this one)
    # module run as `python -m MODULE` for each launched server (masa rehearse: the stand-in)
    sglang_server_module: str = "sglang.launch_server"
    sglang_router_module: str = "sglang_router.launch_router"   # the router's, likewise
    # extra sglang.launch_server flags, on every server (colocated and slurm/sglang_node.sh alike)
    sglang_extra_args: list[str] = field(default_factory=list)
    weight_sync: str = "disk"              # disk | broadcast | tensor
    weight_sync_bucket_mb: int = 512
    weight_sync_verify: bool = False       # compare sampled weights after every sync
    # broadcast sync: one collective per bucket (load_format "flattened_bucket"); needs an SGLang
    # whose /update_weights_from_distributed takes load_format (see weight_sync/broadcast.py)
    weight_sync_flattened_broadcast: bool = False
    # broadcast sync: the address servers reach the sender at; "" = the route's source address
    weight_sync_master_address: str = ""
    colocate: bool = False
    offload_train_state: bool = False


@dataclass
class GRPOConfig:
    """Policy optimisation (spec section 5)."""
    group_size: int = 16                   # G solution rollouts per problem
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: Optional[float] = 10.0
    loss_agg: str = "token-mean"           # token-mean | seq-mean-token-mean | seq-mean-token-sum
    # KL to a reference policy: must stay 0 until a reference model is wired into the loop
    # (config_checks refuses anything else); kl_type is then the estimator, k1 | k3
    kl_coef: float = 0.0
    kl_type: str = "k3"
    tis_cap: Optional[float] = None        # truncated importance sampling vs rollout log-probs
    adv_eps: float = 1e-6
    ppo_epochs: int = 1
    mini_batches_per_step: int = 1         # equal consecutive parts of the step's samples
    # > 0: mini-batches of this many sequences over all DP ranks instead, the last one shorter
    # with its loss scaled by its share (the reference: 128 prompts x n = 2048; train/batching.py)
    mini_batch_sequences: int = 0
    # reorder sequences across DP ranks into equal counts with balanced tokens before
    # mini-batching (the reference's balance_batch); needs computed advantages only
    balance_sequences: bool = False
    # recompute: a no-grad forward before the update gives old_logp (also logs entropy and the
    # trainer-vs-engine gap). policy: old_logp = the update's own logp, detached (ratio exactly
    # 1; the same gradient, one forward less); only with one optimizer step per RL step.
    old_logprobs: str = "recompute"
    micro_batch_tokens: int = 16384        # token budget per micro-batch
    # micro-batches that compute each distinct prompt once and attend its samples' responses to
    # it (train/shared_prefix.py; ~2x fewer positions with G samples per prompt); used where the
    # model allows (local spec, one pipeline stage, no SP/CP, recompute, dropout, FP8, MoE),
    # else the padded layout; the log line "actor: shared-prefix micro-batches ..." says which
    shared_prefix: bool = True
    dynamic_sampling: bool = False         # DAPO: drop zero-variance groups after generation
    dynamic_sampling_max_rounds: int = 1   # >1: over-sample to refill the batch


@dataclass
class MASAConfig:
    """MASA (spec sections 2-6, 9). mode: grpo | masa | masa_efficient."""
    mode: str = "masa"
    meta_group_size: int = 8               # M meta rollouts per problem
    parser: str = "robust"                 # robust | reference
    # notion reward: spec (drop notions in the problem; case-sensitive suffix rules) | reference
    # (drop notions anywhere in the meta prompt; lower-cased suffix tests, only "series" exempt)
    notion_rules: str = "spec"
    reward_base: float = 0.01
    max_source: str = "response"           # {MAX} in the meta prompt: response | prompt
    efficient_start_step: int = 80         # k
    gate_sigma: float = 0.1
    gate_min_parsed_fraction: float = 0.5  # gate only if >= ceil(M * this) predictions parsed
    cutoff_margin: float = 2.0
    predictor: str = "text"                # text | head | both (both: text decides, head logged)
                                           # | dotted path to a masa.predictors.Predictor
    gating: str = "auto"                   # auto (from predictor) | registered name | dotted path
    cutoff: str = "auto"                   # auto (from predictor) | registered name | dotted path
    audit_fraction: float = 0.05
    head_gate_threshold: float = 0.9
    head_loss_weight: float = 0.0          # 0: head detached; > 0: its loss also trains the backbone
    head_lr: float = 1e-3
    notion_hints: bool = False
    # metas first (masa_efficient with text predictions, notion hints): request a problem's
    # solutions as soon as its own metas are answered (SGLang); the embedded engine always
    # generates all metas, then all solutions (it runs whole batches in lockstep)
    stream_solutions: bool = True
    behaviour_cloning: bool = False
    bc_min_notion: float = 0.2
    bc_every: int = 10


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    prompt_batch_size: int = 128           # problems per RL step
    shuffle: bool = True
    seed: int = 0
    reward: str = "math"                   # registered reward name or dotted path
    solution_suffix: bool = True           # false: the solution prompt is the bare problem


@dataclass
class OptimizerConfig:
    name: str = "adam"                     # adam (AdamW with weight_decay) | sgd
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 20
    schedule: str = "constant"             # constant | cosine


@dataclass
class TrainerConfig:
    steps: int = 314
    eval_every: int = 0                    # 0: no in-loop evaluation (held-out: data.eval_files)
    eval_n: int = 4                        # solutions per held-out problem
    eval_meta_n: int = 4                   # meta rollouts per held-out problem (any mode)
    eval_temperature: float = 1.0
    eval_top_p: Optional[float] = None     # None: rollout.top_p
    eval_subset: int = 0                   # > 0: a fixed seeded sample of this many problems
    max_consecutive_nonfinite: int = 3
    check_ratio_invariant: bool = True
    ratio_tolerance: Optional[float] = None  # None: by model.dtype (train/actor.RATIO_TOLERANCE)
    output_dir: str = "runs/default"


@dataclass
class CheckpointConfig:
    save_every: int = 50
    keep_last: int = 3
    resume: str = "auto"                   # auto | none | a checkpoint path
    dir: Optional[str] = None              # default: <output_dir>/checkpoints
    fallback_on_corrupt: bool = False      # resume=auto: a damaged newest checkpoint is set
                                           # aside and the previous complete one resumed


@dataclass
class LoggingConfig:
    jsonl: bool = True
    tensorboard: bool = False
    wandb_project: Optional[str] = None
    progress: bool = True
    log_every: int = 1


@dataclass
class ExperimentConfig:
    name: str = "masa"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    masa: MASAConfig = field(default_factory=MASAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------- loading


def _suggest(key: str, node: Any) -> str:
    names = list(node.keys()) if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(key, names, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as err:
        key = str(err.key) if err.key is not None else "?"
        path = f"{err.full_key}" if err.full_key else key
        parent = OmegaConf.select(base, path.rsplit(".", 1)[0]) if "." in path else base
        raise ConfigError(f"{source}: unknown key '{path}'{_suggest(key, parent)}") from None
    except (ValidationError, OmegaConfBaseException) as err:
        field_name = getattr(err, "full_key", None) or "?"
        value = getattr(err, "value", None)
        msg = str(err).splitlines()[0]
        raise ConfigError(f"{source}: field '{field_name}' = {value!r}: {msg}") from None


def parse_overrides(overrides: list[str]) -> DictConfig:
    """`a.b=c` strings -> a DictConfig; a string without '=' is an error naming it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as err:  # omegaconf and yaml errors both reach here
        raise ConfigError(f"overrides {' '.join(overrides)}: {str(err).splitlines()[0]}") from None


def load_config(path: Optional[str | Path] = None, overrides: list[str] = (),
                base: Optional[ExperimentConfig] = None) -> ExperimentConfig:
    """Merge defaults (or `base`, e.g. a recipe), a YAML file and dotted overrides; validate."""
    cfg = OmegaConf.structured(base if base is not None else ExperimentConfig())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # yaml errors come in many types
            raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"config file '{path}' must hold a mapping at top level")
        cfg = _merge(cfg, loaded, str(path))
    if overrides:
        cfg = _merge(cfg, parse_overrides(list(overrides)), "override")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"field '{missing[0]}' is required but not set")
    exp = OmegaConf.to_object(cfg)
    validate_static(exp)
    return exp


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)

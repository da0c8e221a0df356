"""Launch a recipe with NeMo-Run, on this machine or on a Slurm cluster.

    python -m recipes.launch RECIPE [key=value ...] --executor local|slurm [--dryrun] [options]

Before anything is submitted the config is resolved (recipe + overrides) and validated
statically, the launch layout is checked (TP x PP x CP must divide the GPUs, SGLang servers must
fit their GPUs) and the per-GPU memory estimate is printed (GPU recipes must fit; pass
--ignore-memory-estimate to launch anyway). A bad config or layout is one line on stderr and exit
code 2, and nothing is submitted.

- `--executor local`: a `LocalExecutor` runs `torchrun --standalone --nproc-per-node=<ranks>
  -m masa_megatron.cli train --recipe RECIPE key=value ...` on this machine (one node).
- `--executor slurm`: a `SlurmExecutor` (account, partition, nodes, GPUs per node, container
  image and mounts, time) submits from a login node (LocalTunnel) or over SSH (--ssh-host). Each
  training node runs the command of `torchrun_argv`, the same one slurm/colocated.sbatch gets from
  `--print-torchrun`, so the two launch paths cannot diverge. Disaggregated recipes (SGLang on
  their own nodes) run slurm/disaggregated.sbatch inside the NeMo-Run allocation.

Experiments are named after the recipe (`--name`); NeMo-Run keeps their metadata and logs under
$NEMORUN_HOME/experiments/<name>/<name>_<timestamp>/ (default ~/.nemo_run), and on the cluster
under --job-dir. `--dryrun` prints what would run (for Slurm: the rendered sbatch script, kept in
the experiment folder) and submits nothing.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from masa_megatron.config import ExperimentConfig, load_config
from masa_megatron.errors import UserError
from masa_megatron.memory_estimator import (
    ModelArch,
    estimate,
    fits,
    format_estimate,
)
from recipes import RecipeInfo, get_recipe_info

EXIT_BAD_INPUT = 2
MASA_ROOT = Path(__file__).resolve().parents[1]
MASTER_PORT = 29500
# Left for the shell of each training node to expand (exported by the sbatch scripts / executor).
RUNTIME_TOKENS = ("--rdzv-endpoint=${MASTER_ADDR}:${MASTER_PORT}", "--rdzv-id=${SLURM_JOB_ID}")
# torchrun with restarts. Its c10d rendezvous otherwise lends the workers its own TCP store
# (TORCHELASTIC_USE_AGENT_STORE) and keeps that store, with every key an attempt wrote, for the
# next attempt, whose default process group reads the same keys again: a restarted rank that
# reads a late peer's address before the peer rewrites it connects to the dead rank's port
# (gloo: `connectFullMesh ... Connection refused`, or a hang; NCCL: a stale unique id). torch's
# own opt-out gives every rendezvous round a new store, hosted by the new rank 0.
RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@dataclass(frozen=True)
class Topology:
    """Where a run goes: training nodes x processes per node, plus SGLang-only nodes."""
    train_nodes: int
    procs_per_node: int
    rollout_nodes: int = 0
    gpu: bool = True

    @property
    def train_world(self) -> int:
        return self.train_nodes * self.procs_per_node

    @property
    def total_nodes(self) -> int:
        return self.train_nodes + self.rollout_nodes


# ---------------------------------------------------------------- checks before submission

def resolve(recipe: str, overrides: list[str]) -> tuple[RecipeInfo, ExperimentConfig]:
    """The recipe plus overrides, statically validated (what `masa config show` prints)."""
    info = get_recipe_info(recipe)
    return info, load_config(overrides=overrides, base=info.build())


def topology_for(info: RecipeInfo, cfg: ExperimentConfig, nodes: int | None = None,
                 gpus_per_node: int | None = None,
                 rollout_nodes: int | None = None) -> Topology:
    """The recipe's topology, with --nodes (all nodes), --gpus-per-node, --rollout-nodes."""
    disaggregated = cfg.rollout.engine == "sglang" and not cfg.rollout.colocate
    rollout = (info.rollout_nodes if rollout_nodes is None else rollout_nodes) \
        if disaggregated else 0
    total = nodes if nodes is not None else info.train_nodes + rollout
    return Topology(train_nodes=total - rollout, rollout_nodes=rollout,
                    procs_per_node=gpus_per_node or info.procs_per_node,
                    gpu=bool(info.gpus_per_node))


def check_layout(cfg: ExperimentConfig, topo: Topology) -> None:
    """Raise UserError (one line) for a layout that cannot run on `topo`."""
    p, r = cfg.parallel, cfg.rollout
    if topo.train_nodes < 1:
        raise UserError(f"the launch has {topo.total_nodes} node(s) but {topo.rollout_nodes} "
                        f"of them are for SGLang; no node is left for training")
    world = topo.train_world
    if p.world_size is not None and p.world_size != world:
        raise UserError(f"field 'parallel.world_size' = {p.world_size}: the launch has "
                        f"{topo.train_nodes} training node(s) x {topo.procs_per_node} = {world} ranks "
                        f"(override parallel.world_size={world} to use them)")
    mp = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    if world % mp:
        raise UserError(
            f"field 'parallel.tensor_model_parallel_size' = {p.tensor_model_parallel_size}: "
            f"TP x PP x CP = {p.tensor_model_parallel_size} x {p.pipeline_model_parallel_size} "
            f"x {p.context_parallel_size} = {mp} does not divide the {world} ranks of the launch")
    longest = r.max_prompt_length + r.max_response_length
    if cfg.grpo.micro_batch_tokens < longest:
        raise UserError(f"field 'grpo.micro_batch_tokens' = {cfg.grpo.micro_batch_tokens}: "
                        f"smaller than the longest sequence ({longest} = max prompt + response)")
    if r.engine == "sglang" and not r.sglang_urls:
        gpus = world if r.colocate else topo.rollout_nodes * topo.procs_per_node
        needed = r.sglang_num_servers * r.sglang_tp
        field = f"field 'rollout.sglang_num_servers' = {r.sglang_num_servers}"
        if needed > gpus or topo.procs_per_node % r.sglang_tp:
            where = "training" if r.colocate else "rollout"
            raise UserError(f"{field}: {r.sglang_num_servers} servers x TP {r.sglang_tp} = "
                            f"{needed} GPUs do not fit the {gpus} {where} GPUs "
                            f"({topo.procs_per_node} per node)")
        if r.colocate:   # each node's local rank 0 starts that node's share of the servers
            if r.sglang_num_servers % topo.train_nodes:
                raise UserError(f"{field}: colocated servers are started per node; "
                                f"{topo.train_nodes} nodes cannot hold an equal share")
            if r.weight_sync == "tensor" and needed != world:
                raise UserError(f"{field}: weight_sync=tensor needs a server beside every "
                                f"training rank: servers x TP = {r.sglang_num_servers} x "
                                f"{r.sglang_tp} = {needed} GPUs, the launch has {world} ranks")


def model_arch(cfg: ExperimentConfig, info: RecipeInfo) -> ModelArch | None:
    """The checkpoint's own config.json when readable here, else the recipe's numbers."""
    config_json = Path(cfg.model.hf_path) / "config.json"
    if config_json.is_file():
        return ModelArch.from_hf_config(config_json)
    return info.arch


def memory_report(cfg: ExperimentConfig, info: RecipeInfo) -> tuple[str, bool]:
    """(printable estimate, fits) for GPU recipes; CPU recipes always fit."""
    arch = model_arch(cfg, info) if info.gpus_per_node else None
    if arch is None:
        return "memory estimate: skipped (CPU recipe)", True
    est = estimate(cfg, arch)
    return format_estimate(est, f"{cfg.name}, {arch.name}"), fits(est)


# ---------------------------------------------------------------- the command each node runs

def torchrun_argv(recipe: str, overrides: list[str], topo: Topology,
                  standalone: bool = False, max_restarts: int = 0) -> list[str]:
    """torchrun on one training node: c10d rendezvous at $MASTER_ADDR (Slurm), or standalone.
    With `max_restarts`, torchrun restarts every rank after one fails, up to that many times;
    the run resumes from its last checkpoint (checkpoint.resume=auto), next to SGLang servers
    that kept running (disaggregated) or with new ones (colocated). Restarts run torchrun with
    RESTART_ENV (see there), through `env` so that the command needs no shell."""
    rendezvous = ["--standalone"] if standalone else ["--rdzv-backend=c10d", *RUNTIME_TOKENS]
    restarts = [f"--max-restarts={max_restarts}"] if max_restarts else []
    launcher = ["env", *(f"{k}={v}" for k, v in RESTART_ENV.items())] if max_restarts else []
    return [*launcher, "torchrun", f"--nnodes={topo.train_nodes}",
            f"--nproc-per-node={topo.procs_per_node}", *rendezvous, *restarts,
            "-m", "masa_megatron.cli", "train", "--recipe", recipe, *overrides]


def shell_words(argv: list[str]) -> list[str]:
    """Shell-quote each word except the ${VAR} tokens the node's shell must expand."""
    return [word if word in RUNTIME_TOKENS else shlex.quote(word) for word in argv]


def torchrun_command_line(recipe: str, overrides: list[str], topo: Topology,
                          max_restarts: int = 0) -> str:
    return " ".join(shell_words(torchrun_argv(recipe, overrides, topo,
                                              max_restarts=max_restarts)))


def _absolute(folder: str, root: str) -> str:
    return folder if os.path.isabs(folder) else os.path.join(root, folder)


def with_absolute_folders(cfg: ExperimentConfig, overrides: list[str], root: str) -> list[str]:
    """`overrides` plus absolute trainer.output_dir / checkpoint.dir under `root` (the checkout
    on the shared file system) where the config has them relative: every rank, on every node,
    then writes to the same folder whatever its working directory."""
    extra = []
    if not os.path.isabs(cfg.trainer.output_dir):
        extra.append(f"trainer.output_dir={_absolute(cfg.trainer.output_dir, root)}")
    if cfg.checkpoint.dir and not os.path.isabs(cfg.checkpoint.dir):
        extra.append(f"checkpoint.dir={_absolute(cfg.checkpoint.dir, root)}")
    return [*overrides, *extra]


def rollout_env(cfg: ExperimentConfig, topo: Topology, root: str) -> dict[str, str]:
    """What slurm/disaggregated.sbatch and slurm/sglang_node.sh need to start SGLang the way
    the config says: the same flags as the colocated path (sglang_launch.server_flags, without
    host, port and first GPU, which the node script sets per server) and the log folder."""
    from masa_megatron.rollout.sglang_launch import ServerOptions, server_flags

    r = cfg.rollout
    opts = ServerOptions(model_path=cfg.model.hf_path, tp=r.sglang_tp,
                         mem_fraction=r.sglang_mem_fraction, seed=r.seed,
                         deterministic=r.sglang_deterministic, memory_saver=r.colocate,
                         extra_args=list(r.sglang_extra_args))
    return {"MODEL_PATH": cfg.model.hf_path, "SGLANG_TP": str(r.sglang_tp),
            "SGLANG_MEM_FRACTION": str(r.sglang_mem_fraction),
            "SGLANG_BASE_PORT": str(r.sglang_base_port),
            "SGLANG_SERVERS_PER_NODE": str(topo.procs_per_node // r.sglang_tp),
            "SGLANG_ROUTER": "1" if r.sglang_router else "0",
            "SGLANG_SERVER_ARGS": shlex.join(server_flags(opts, placement=False)),
            "SGLANG_SERVER_MODULE": r.sglang_server_module,
            "SGLANG_ROUTER_MODULE": r.sglang_router_module,
            "SGLANG_LOG_DIR": os.path.join(_absolute(cfg.trainer.output_dir, root),
                                           "sglang_logs"),
            "TRAIN_NODES": str(topo.train_nodes), "ROLLOUT_NODES": str(topo.rollout_nodes)}


# ---------------------------------------------------------------- NeMo-Run

def _packager(run, choice: str):
    if choice == "auto":
        inside_git = subprocess.run(["git", "-C", str(MASA_ROOT), "rev-parse"],
                                    capture_output=True, check=False).returncode == 0
        choice = "git" if inside_git else "none"
    return run.GitArchivePackager() if choice == "git" else run.Packager()


def _env_vars(args) -> dict[str, str]:
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env '{item}' is not of the form KEY=VALUE")
        env[key] = value
    return env


def _quoted(env: dict[str, str]) -> dict[str, str]:
    """Values for NeMo-Run's unquoted `export K=V` lines; `$var` values stay expandable."""
    return {k: v if v.startswith("$") else shlex.quote(v) for k, v in env.items()}


def build_local(run, args, info: RecipeInfo, topo: Topology):
    """One torchrun on this machine that starts all ranks. Not NeMo-Run's Torchrun launcher:
    in nemo-run 0.11 it shell-quotes every argument while the local scheduler runs without a
    shell, so an override such as data.train_files=[a.parquet] would reach `masa` quoted."""
    # torchrun and python of this environment, even when it is not activated
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
    executor = run.LocalExecutor(ntasks_per_node=1, env_vars=_env_vars(args))
    argv = torchrun_argv(info.name, list(args.overrides), topo, standalone=True,
                         max_restarts=args.max_restarts)
    return executor, run.Script(path=argv[1], entrypoint=argv[0], args=argv[2:])


def build_slurm(run, args, info: RecipeInfo, topo: Topology):
    if not args.account:
        raise UserError("--executor slurm needs --account")
    if args.ssh_host:   # NeMo-Run copies the experiment folder to job_dir over SSH
        job_dir = args.job_dir or os.path.join(run.config.get_nemorun_home(), "experiments")
        tunnel = run.SSHTunnel(host=args.ssh_host.split("@")[-1], job_dir=job_dir,
                               user=args.ssh_host.split("@")[0] if "@" in args.ssh_host else None)
    else:   # no copy: the script is submitted from where it is written, $NEMORUN_HOME/experiments
        if args.job_dir:
            run.config.set_nemorun_home(os.path.abspath(args.job_dir))
        tunnel = run.LocalTunnel(job_dir=os.path.join(run.config.get_nemorun_home(),
                                                      "experiments"))
    mounts = [m for item in args.container_mounts for m in item.split(",") if m]
    env = {"PYTHONPATH": args.masa_root, **_env_vars(args)}    # rendered as `export K=V` lines
    common = {"account": args.account, "partition": args.partition, "time": args.time,
              "nodes": topo.total_nodes, "ntasks_per_node": 1, "tunnel": tunnel,
              "gpus_per_node": topo.procs_per_node if topo.gpu else None,
              "exclusive": True if topo.gpu else None,
              "packager": _packager(run, args.packager), "job_name_prefix": f"{args.name}-"}
    if topo.rollout_nodes:   # orchestration (servers, health waits, router) lives in the script
        env |= {"RECIPE": info.name, "MASA_ROOT": args.masa_root, "GPUS_PER_NODE":
                str(topo.procs_per_node), "ROLLOUT_NODES": str(topo.rollout_nodes),
                "CONTAINER_IMAGE": args.container_image or "",
                "CONTAINER_MOUNTS": ",".join(mounts)}
        executor = run.SlurmExecutor(**common, env_vars=_quoted(env),
                                     srun_args=["--nodes=1", "--ntasks=1", "--overlap"])
        task = run.Script(path=f"{args.masa_root}/slurm/disaggregated.sbatch", entrypoint="bash",
                          args=[shlex.quote(o) for o in args.overrides])
        return executor, task
    # The first node's name, as slurm/colocated.sbatch uses: NeMo-Run's $head_node_ip comes from
    # `hostname --ip-address`, which lists every address of the name (Debian maps it to 127.0.1.1
    # too), so the rendezvous endpoint would be "127.0.1.1 10.0.0.5:29500".
    env |= {"MASTER_ADDR": "$head_node", "MASTER_PORT": str(MASTER_PORT)}
    executor = run.SlurmExecutor(**common, env_vars=_quoted(env),
                                 container_image=args.container_image, container_mounts=mounts)
    words = shell_words(torchrun_argv(info.name, list(args.overrides), topo,
                                      max_restarts=args.max_restarts))
    return executor, run.Script(path=words[1], entrypoint=words[0], args=words[2:])


def submit(args, info: RecipeInfo, topo: Topology) -> int:
    import nemo_run as run  # heavy (~7 s): imported only once everything else has passed

    if os.environ.get("NEMORUN_HOME"):
        run.config.set_nemorun_home(os.environ["NEMORUN_HOME"])
    if args.executor == "local":
        executor, task = build_local(run, args, info, topo)
    else:
        executor, task = build_slurm(run, args, info, topo)
    with run.Experiment(args.name, executor=executor, log_level="INFO") as exp:
        exp.add(task, name="train")
        if args.dryrun:
            exp.dryrun(delete_exp_dir=False)
            folder = Path(exp._exp_dir)
            for script in folder.glob("*_sbatch.sh"):
                print(f"sbatch script: {script}")
            print(f"dry run: nothing submitted; experiment folder {folder}")
            return 0
        local = args.executor == "local"
        exp.run(detach=not local, tail_logs=local)
    states = [str(job.state) for job in exp.jobs]      # leaving the block waited for local jobs
    if local and not all(state.endswith("SUCCEEDED") for state in states):
        print(f"launch: the job ended {', '.join(states)}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m recipes.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="a registered recipe (`masa recipes`)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.steps=10")
    parser.add_argument("--executor", choices=["local", "slurm"], default="local")
    parser.add_argument("--dryrun", action="store_true", help="print what would run; submit nothing")
    parser.add_argument("--name", help="experiment name (default: the recipe name)")
    parser.add_argument("--nodes", type=int, help="all nodes of the job (default: the recipe's)")
    parser.add_argument("--gpus-per-node", type=int, help="default: the recipe's (8; CPU: 2)")
    parser.add_argument("--rollout-nodes", type=int,
                        help="nodes that only run SGLang (disaggregated recipes; default: the "
                             "recipe's)")
    parser.add_argument("--max-restarts", type=int, default=0, metavar="N",
                        help="torchrun restarts every rank up to N times after one fails; the "
                             "run resumes from its last checkpoint (default 0)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the job (repeatable)")
    parser.add_argument("--ignore-memory-estimate", action="store_true",
                        help="launch even if the estimate exceeds the GPU memory")
    parser.add_argument("--print-torchrun", action="store_true",
                        help="print the torchrun command of a Slurm training node and exit")
    parser.add_argument("--print-rollout-env", action="store_true",
                        help="print the SGLang settings as shell assignments and exit")
    slurm = parser.add_argument_group("slurm")
    slurm.add_argument("--account")
    slurm.add_argument("--partition")
    slurm.add_argument("--time", default="24:00:00", help="wall-clock limit (default 24:00:00)")
    slurm.add_argument("--container-image", help="enroot/pyxis image, e.g. nvcr.io#nvidia/pytorch")
    slurm.add_argument("--container-mounts", action="append", default=[],
                       metavar="SRC:DST[,SRC:DST]", help="repeatable")
    slurm.add_argument("--job-dir", help="cluster folder for logs and code (default: "
                                         "$NEMORUN_HOME/experiments; on a login node, without "
                                         "--ssh-host: NeMo-Run's home, experiments under "
                                         "JOB_DIR/experiments)")
    slurm.add_argument("--ssh-host", metavar="[USER@]HOST", help="submit over SSH to this host")
    slurm.add_argument("--packager", choices=["auto", "git", "none"], default="auto",
                       help="git: ship HEAD with git archive; none: code comes from the image or "
                            "--masa-root on a shared file system; auto: git inside a git clone")
    slurm.add_argument("--masa-root", default=str(MASA_ROOT),
                       help="this repository's path on the cluster (default: this checkout)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    args.name = args.name or args.recipe
    try:
        info, cfg = resolve(args.recipe, args.overrides)
        topo = topology_for(info, cfg, args.nodes, args.gpus_per_node, args.rollout_nodes)
        check_layout(cfg, topo)
        if args.print_torchrun:
            overrides = with_absolute_folders(cfg, args.overrides, args.masa_root)
            print(torchrun_command_line(info.name, overrides, topo, args.max_restarts))
            return 0
        if args.print_rollout_env:
            env = rollout_env(cfg, topo, args.masa_root)
            print("\n".join(f"{k}={shlex.quote(v)}" for k, v in env.items()))
            return 0
        if args.executor == "local" and topo.total_nodes != 1:
            raise UserError(f"recipe '{info.name}' needs {topo.total_nodes} nodes; "
                            f"use --executor slurm")
        from masa_megatron.config import to_yaml
        print(f"# resolved config: {info.name} {' '.join(args.overrides)}".rstrip())
        print(to_yaml(cfg), end="")
        report, ok = memory_report(cfg, info)
        print(report)
        if not ok and not args.ignore_memory_estimate:
            raise UserError(f"recipe '{info.name}' does not fit the GPU memory by the estimate "
                            f"above; change the layout or pass --ignore-memory-estimate")
        if args.executor == "slurm":
            args.overrides = with_absolute_folders(cfg, args.overrides, args.masa_root)
        return submit(args, info, topo)
    except UserError as err:
        print(f"launch: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

"""slurm/*.sbatch: syntax, shellcheck, documented knobs, DRY_RUN output, and a run against stub
Slurm commands (srun, scontrol, curl, torchrun, SGLang) that checks the torchrun arguments each
node gets and that every background step is stopped at exit."""
import os
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch")) + sorted((REPO / "slurm").glob("*.sh"))
SBATCH = [p for p in SCRIPTS if p.suffix == ".sbatch"]
OVERRIDES = ["trainer.steps=5", "data.train_files=[/data/my train.parquet]"]


def run_script(name, *args, timeout=120, **env):
    full_env = {**os.environ, "PYTHON": sys.executable, "MASA_ROOT": str(REPO), **env}
    full_env.pop("SLURM_JOB_NODELIST", None) if "SLURM_JOB_NODELIST" not in env else None
    return subprocess.run(["bash", str(REPO / "slurm" / name), *args], env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def sections(text: str) -> dict[str, str]:
    found, name = {}, None
    for line in text.splitlines():
        if line.startswith("== ") and line.endswith(" =="):
            name, found[line[3:-3]] = line[3:-3], ""
        elif name:
            found[name] += line + "\n"
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck not installed (apt-get install shellcheck; CI installs it)")
def test_scripts_pass_shellcheck():
    result = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_every_knob_is_a_documented_variable_at_the_top(script):
    text = script.read_text()
    knobs = text.split("# ---- knobs", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    assert len(knobs) >= 8 and "DRY_RUN=${DRY_RUN:-0}" in text
    for line in knobs:
        name = line.split("=", 1)[0]
        assert line.startswith(f"{name}=${{{name}:-") and " # " in line, line


def test_colocated_dry_run_prints_config_torchrun_and_commands():
    result = run_script("colocated.sbatch", *OVERRIDES, DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    out = sections(result.stdout)
    assert "name: qwen3_8b_masa_1n8g" in out["resolved config"]
    assert "steps: 5" in out["resolved config"]
    assert out["torchrun"].startswith("torchrun --nnodes=1 --nproc-per-node=8 ")
    assert "srun --nodes=1 --ntasks=1 --ntasks-per-node=1 --gpus-per-node=8" in out["commands"]


def test_dry_run_of_a_bad_config_exits_2_with_one_line():
    result = run_script("colocated.sbatch", "parallel.tensor_model_parallel_size=16", DRY_RUN="1")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "16" in result.stderr


def test_disaggregated_dry_run_starts_servers_router_then_trainer():
    result = run_script("disaggregated.sbatch", "trainer.steps=5", DRY_RUN="1",
                        DRY_RUN_NODES="roll0 train0")
    assert result.returncode == 0, result.stderr
    out = sections(result.stdout)
    urls = [f"http://roll0:{30000 + i}" for i in range(4)]
    assert f"rollout.sglang_urls=[{','.join(urls)}]" in out["torchrun"]
    assert f"sglang_urls:\n  - {urls[0]}" in out["resolved config"].replace("  sglang", "sglang")
    commands = out["commands"].splitlines()
    order = [next(i for i, line in enumerate(commands) if key in line) for key in (
        "--nodelist=roll0 --gpus-per-node=8", "wait for http://roll0:30003/health",
        "sglang_router.launch_router", "wait for http://roll0:30080/health",
        "--nodelist=train0 --gpus-per-node=8")]
    assert order == sorted(order), out["commands"]
    assert "export MASTER_ADDR=train0" in out["commands"]


def test_disaggregated_needs_the_recipes_node_count():
    result = run_script("disaggregated.sbatch", DRY_RUN="1", DRY_RUN_NODES="only-one")
    assert result.returncode == 2 and "needs 1 rollout + 1 training node" in result.stderr


# ---------------------------------------------------------------- stub Slurm

def write_stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def stub_slurm(tmp_path):
    """srun (drops its options, runs the command; SGLang and the router become fake servers that
    sleep until killed), scontrol, curl (always healthy) and torchrun (logs its arguments)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    marker = f"masa-fake-server-{uuid.uuid4().hex[:8]}"
    write_stub(bin_dir, "srun", 'while [[ $# -gt 0 && $1 == -* ]]; do shift; done\n'
                                'if [[ "${2:-}" == -m && "${3:-}" == sglang* ]]; then\n'
                                '    set -- "$FAKE_SERVER" "${@:2}"; fi\n'
                                'echo "srun $*" >> "$STUB_LOG"\n'
                                '[[ "$*" == *sglang_node.sh* ]] && export PYTHON="$FAKE_SERVER"\n'
                                'exec "$@"\n')
    write_stub(bin_dir, "fake-server", 'echo "server GPUS=${CUDA_VISIBLE_DEVICES:-} $*" '
                                       f'>> "$STUB_LOG"\nexec -a {marker} sleep 60\n')
    write_stub(bin_dir, "scontrol", 'printf "%s\\n" $STUB_HOSTS\n')
    write_stub(bin_dir, "curl", "exit 0\n")
    write_stub(bin_dir, "torchrun", 'printf "torchrun-arg %s\\n" "$@" >> "$STUB_LOG"\n'
                                    'exit "${TORCHRUN_EXIT:-0}"\n')
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log),
           "FAKE_SERVER": str(bin_dir / "fake-server"), "SLURM_JOB_NODELIST": "stub[0-1]",
           "SLURM_JOB_ID": "4242"}
    yield env, log, marker
    leftovers = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    for pid in leftovers.split():      # our own fake servers only, should there be any
        subprocess.run(["kill", pid], check=False)
    assert not leftovers, "fake SGLang servers outlived the script"


def test_colocated_run_expands_the_rendezvous_on_the_node(stub_slurm):
    env, log, _ = stub_slurm
    result = run_script("colocated.sbatch", *OVERRIDES, STUB_HOSTS="gpu7", NODES="1",
                        MAX_RESTARTS="2", **env)
    assert result.returncode == 0, result.stderr
    args = [line.split(" ", 1)[1] for line in log.read_text().splitlines()
            if line.startswith("torchrun-arg ")]
    assert "--rdzv-endpoint=gpu7:29500" in args and "--rdzv-id=4242" in args
    assert "--max-restarts=2" in args
    assert args[-3:] == ["trainer.steps=5", "data.train_files=[/data/my train.parquet]",
                         f"trainer.output_dir={REPO}/runs/qwen3_8b_masa_1n8g"]


@pytest.mark.parametrize("torchrun_exit", [0, 3])
def test_disaggregated_run_stops_servers_and_router_at_exit(stub_slurm, torchrun_exit,
                                                            tmp_path):
    env, log, _ = stub_slurm
    result = run_script("disaggregated.sbatch", "trainer.steps=5",
                        f"trainer.output_dir={tmp_path / 'run'}", STUB_HOSTS="roll0 train0",
                        TORCHRUN_EXIT=str(torchrun_exit), SLURM_JOB_NUM_NODES="2", **env)
    assert result.returncode == torchrun_exit, result.stderr
    calls = log.read_text()
    for i in range(4):
        gpus = f"{2 * i},{2 * i + 1}"
        assert f"server GPUS={gpus} -m sglang.launch_server" in calls
        assert f"--port {30000 + i}" in calls
    assert "-m sglang_router.launch_router --worker-urls http://roll0:30000" in calls
    assert "torchrun-arg rollout.sglang_urls=[http://roll0:30000," in calls
    # the trainer uses the router this script started (issue 24, defect 3)
    assert "torchrun-arg rollout.sglang_router_url=http://roll0:30080" in calls
    assert "stopping 2 background step(s)" in result.stderr


def test_rollout_nodes_start_servers_like_the_colocated_path_and_log_to_the_run(stub_slurm,
                                                                                 tmp_path):
    """slurm/sglang_node.sh gets its flags from the resolved config (--skip-tokenizer-init, the
    seed, determinism, rollout.sglang_extra_args) and writes each server's log to
    <output_dir>/sglang_logs/<node>/server-<i>.log on the shared file system (issue 24, defect 6)."""
    env, log, _ = stub_slurm
    run_dir = tmp_path / "run"
    result = run_script("disaggregated.sbatch", f"trainer.output_dir={run_dir}",
                        "rollout.sglang_deterministic=true",
                        "rollout.sglang_extra_args=[--chunked-prefill-size,4096]",
                        STUB_HOSTS="roll0 train0", SLURM_JOB_NUM_NODES="2", **env)
    assert result.returncode == 0, result.stderr
    servers = [line for line in log.read_text().splitlines()
               if line.startswith("server ") and "-m sglang.launch_server" in line]
    assert len(servers) == 4
    for line in servers:
        for flag in ("--skip-tokenizer-init", "--enable-deterministic-inference",
                     "--random-seed 0", "--chunked-prefill-size 4096", "--host 0.0.0.0"):
            assert flag in line, line
    logs = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("server-*.log"))
    assert len(logs) == 4 and all(p.startswith("sglang_logs/") for p in logs), logs

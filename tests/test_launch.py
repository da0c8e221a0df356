"""The NeMo-Run launcher: checks before submission, rendered Slurm scripts, and agreement with
slurm/colocated.sbatch (same resolved config, same torchrun command)."""
import importlib
import importlib.util
import io
import os
import re
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from recipes import get_recipe, get_recipe_info, launch
from recipes.launch import main, torchrun_command_line, topology_for
from tests.support.timeouts import outlasting

REPO = Path(__file__).resolve().parents[1]
RECIPE = "qwen3_8b_masa_1n8g"
OVERRIDES = ["trainer.steps=5", "data.train_files=[/data/my train.parquet]"]
SLURM = ["--executor", "slurm", "--account", "acct", "--partition", "batch", "--time", "01:00:00",
         "--container-image", "nvcr.io#nvidia/pytorch:25.04-py3",
         "--container-mounts", "/data:/data", "--packager", "none", "--dryrun"]


@pytest.fixture
def no_submission(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("submitted although the checks should have failed")
    monkeypatch.setattr(launch, "submit", refuse)


@pytest.mark.parametrize("overrides, words", [
    (["parallel.tensor_model_parallel_size=16"], ["TP x PP x CP = 16 x 1 x 1"]),
    (["grpo.group_sise=4"], ["grpo.group_sise", "did you mean 'group_size'"]),
    (["grpo.micro_batch_tokens=4096"], ["grpo.micro_batch_tokens", "longest sequence"]),
    (["rollout.sglang_num_servers=8"], ["sglang_num_servers", "do not fit"]),
    (["grpo.micro_batch_tokens=131072"], ["does not fit the GPU memory"]),
])
def test_bad_config_or_layout_fails_before_submission(overrides, words, capsys, no_submission):
    assert main([RECIPE, *overrides, "--executor", "slurm", "--account", "a"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("launch: error:")
    assert all(word in err for word in words), err


@pytest.mark.parametrize("overrides, words", [
    # 2 nodes x 8 GPUs but servers for one node: tensor sync needs a server beside every rank
    (["parallel.world_size=16"], ["rollout.sglang_num_servers", "beside every training rank",
                                  "= 8 GPUs, the launch has 16 ranks"]),
    # an odd number of servers cannot be split evenly over 2 nodes
    (["parallel.world_size=16", "rollout.weight_sync=disk", "rollout.sglang_num_servers=3"],
     ["rollout.sglang_num_servers", "2 nodes"]),
])
def test_colocated_layouts_across_nodes_must_put_servers_on_every_node(overrides, words, capsys,
                                                                       no_submission):
    """Colocated servers are started per node, beside the ranks they serve (issue 24, defect 2):
    layouts that cannot be placed so are refused before submission."""
    assert main([RECIPE, "--nodes", "2", "--print-torchrun", *overrides]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_more_gpus_than_the_recipe_needs_is_a_world_size_error(capsys, no_submission):
    assert main([RECIPE, "--executor", "slurm", "--account", "a", "--nodes", "2"]) == 2
    assert "override parallel.world_size=16" in capsys.readouterr().err


def test_local_executor_refuses_multi_node_recipes(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "nemo_run", None)      # fail before NeMo-Run is needed
    assert main(["qwen3_14b_masa_2n8g", "--executor", "local"]) == 2
    assert "needs 2 nodes" in capsys.readouterr().err


def test_impossible_layout_exits_2_from_the_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "recipes.launch", RECIPE, "parallel.tensor_model_parallel_size=16",
         "--executor", "slurm", "--account", "a", "--dryrun"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "16" in result.stderr
    assert "nemo" not in result.stdout.lower()          # nothing was rendered or submitted


def test_print_torchrun_is_the_slurm_command_line(capsys):
    assert main([RECIPE, "--print-torchrun", *OVERRIDES]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("torchrun --nnodes=1 --nproc-per-node=8 --rdzv-backend=c10d ")
    assert "--rdzv-endpoint=${MASTER_ADDR}:${MASTER_PORT} --rdzv-id=${SLURM_JOB_ID}" in line
    assert f"train --recipe {RECIPE} trainer.steps=5 'data.train_files=[/data/my train.parquet]'" \
        in line


def test_torchrun_gets_absolute_output_folders_under_the_masa_root(capsys):
    """Ranks on different nodes must write to one folder: relative trainer.output_dir and
    checkpoint.dir are made absolute under --masa-root (the checkout on the shared file system)
    in the torchrun command (issue 24, defect 6); absolute ones are left alone."""
    assert main([RECIPE, "--print-torchrun", "trainer.output_dir=runs/a", "checkpoint.dir=ck",
                 "--masa-root", "/shared/masa"]) == 0
    words = capsys.readouterr().out.split()
    assert words[-2:] == ["trainer.output_dir=/shared/masa/runs/a", "checkpoint.dir=/shared/masa/ck"]
    assert main([RECIPE, "--print-torchrun", "trainer.output_dir=/abs/run"]) == 0
    words = capsys.readouterr().out.split()
    assert [w for w in words if w.startswith("trainer.output_dir=")] == ["trainer.output_dir=/abs/run"]


def test_print_rollout_env_for_a_disaggregated_recipe(capsys):
    assert main(["qwen3_14b_masa_2n8g", "--print-rollout-env"]) == 0
    env = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert env["SGLANG_TP"] == "2" and env["SGLANG_SERVERS_PER_NODE"] == "4"
    assert (env["TRAIN_NODES"], env["ROLLOUT_NODES"]) == ("1", "1")
    assert env["MODEL_PATH"] == "/models/Qwen3-14B-Base"


def test_rollout_env_gives_the_colocated_paths_server_flags_and_a_shared_log_folder(capsys):
    """slurm/sglang_node.sh starts servers with the flags the colocated path uses (one source:
    sglang_launch.server_flags), rollout.sglang_extra_args included, and logs under the run's
    absolute output folder (issue 24, defect 6)."""
    import shlex

    assert main(["qwen3_14b_masa_2n8g", "--print-rollout-env", "--masa-root", "/shared/masa",
                 "trainer.output_dir=runs/x", "rollout.sglang_deterministic=true",
                 "rollout.sglang_extra_args=[--chunked-prefill-size,4096]"]) == 0
    env = {k: shlex.split(v)[0] if v else "" for k, v in
           (line.split("=", 1) for line in capsys.readouterr().out.splitlines())}
    flags = shlex.split(env["SGLANG_SERVER_ARGS"])
    for flag in ("--skip-tokenizer-init", "--enable-deterministic-inference", "--random-seed"):
        assert flag in flags
    assert flags[flags.index("--tp-size") + 1] == "2"
    assert flags[-2:] == ["--chunked-prefill-size", "4096"]
    assert not {"--host", "--port", "--base-gpu-id"} & set(flags)   # set per server by the script
    assert env["SGLANG_LOG_DIR"] == "/shared/masa/runs/x/sglang_logs"
    assert (env["SGLANG_SERVER_MODULE"], env["SGLANG_ROUTER_MODULE"]) == \
        ("sglang.launch_server", "sglang_router.launch_router")


# ---------------------------------------------------------------- NeMo-Run dry runs

nemo_run_missing = importlib.util.find_spec("nemo_run") is None
needs_nemo_run = pytest.mark.skipif(nemo_run_missing, reason="nemo-run not installed "
                                    "(pip install -e '.[launch]')")


def dry_run(argv, home: Path, capsys=None):
    """Run the launcher in this process with NEMORUN_HOME=home; (stdout, sbatch script text)."""
    old, stdin = os.environ.get("NEMORUN_HOME"), sys.stdin
    os.environ["NEMORUN_HOME"] = str(home)
    sys.stdin = io.StringIO("")         # NeMo-Run's local tunnel (invoke) reads stdin
    try:
        assert main(argv) == 0
    finally:
        sys.stdin = stdin
        if old is None:
            os.environ.pop("NEMORUN_HOME")
        else:
            os.environ["NEMORUN_HOME"] = old
    scripts = list(home.rglob("*_sbatch.sh"))
    return scripts[0].read_text() if scripts else None


@pytest.fixture(scope="module")
def colocated_dry_run(tmp_path_factory):
    """One NeMo-Run Slurm dry run of RECIPE shared by the tests below (NeMo-Run imports slowly)."""
    home = tmp_path_factory.mktemp("nemorun")
    out = io.StringIO()
    with redirect_stdout(out):
        script = dry_run([RECIPE, *OVERRIDES, *SLURM], home)
    return out.getvalue(), script


@needs_nemo_run
def test_slurm_dry_run_renders_sbatch_lines_and_torchrun(colocated_dry_run):
    out, script = colocated_dry_run
    sbatch = {line for line in script.splitlines() if line.startswith("#SBATCH")}
    for flag in ("--account=acct", "--partition=batch", "--nodes=1", "--ntasks-per-node=1",
                 "--gpus-per-node=8", "--time=01:00:00", "--exclusive",
                 f"--job-name={RECIPE}-train"):
        assert f"#SBATCH {flag}" in sbatch, sbatch
    assert "export MASTER_ADDR=$head_node\n" in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--container-image nvcr.io#nvidia/pytorch:25.04-py3" in srun
    assert "/data:/data" in srun
    topo = topology_for(get_recipe_info(RECIPE), get_recipe(RECIPE))
    absolute = [f"trainer.output_dir={REPO}/runs/{RECIPE}"]    # the shared checkout's folder
    assert srun.endswith(" " + torchrun_command_line(RECIPE, OVERRIDES + absolute, topo))
    assert "memory estimate per GPU" in out and "fits" in out


@needs_nemo_run
def test_local_dry_run_uses_torchrun_with_one_process_per_rank(tmp_path, capfd):
    dry_run(["tiny_cpu_grpo", "model.hf_path=/tmp/tiny", "--executor", "local", "--dryrun"],
            tmp_path)
    out = capfd.readouterr().out
    assert "memory estimate: skipped (CPU recipe)" in out
    app = "".join(out.split("=== APPLICATION ===", 1)[1].split())   # NeMo-Run wraps its log
    app = re.sub(r"[a-z_]+\.py:\d+", "", app)                          # and tags it by line
    assert "'args':['torchrun','--nnodes=1','--nproc-per-node=2','--standalone','-m'," in app
    assert "'masa_megatron.cli','train','--recipe','tiny_cpu_grpo'," in app


@needs_nemo_run
def test_disaggregated_recipe_runs_the_sbatch_orchestration_in_the_allocation(tmp_path, capsys):
    script = dry_run(["qwen3_14b_masa_2n8g", *SLURM], tmp_path)
    assert "#SBATCH --nodes=2" in script and "export ROLLOUT_NODES=1" in script
    assert "export RECIPE=qwen3_14b_masa_2n8g" in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--nodes=1 --ntasks=1 --overlap" in srun and "--container-image" not in srun
    assert srun.endswith(f"bash {REPO}/slurm/disaggregated.sbatch "
                         f"trainer.output_dir={REPO}/runs/qwen3_14b_masa_2n8g")


def sections(text: str) -> dict[str, str]:
    """`== name ==` headed sections of the sbatch DRY_RUN output."""
    found, name = {}, None
    for line in text.splitlines():
        if line.startswith("== ") and line.endswith(" =="):
            name = line[3:-3]
            found[name] = ""
        elif name:
            found[name] += line + "\n"
    return found


@needs_nemo_run
def test_nemo_run_and_sbatch_agree_on_config_and_torchrun(colocated_dry_run):
    out, script = colocated_dry_run
    nemo_config = out.split("# resolved config:", 1)[1].split("\n", 1)[1]
    nemo_config = nemo_config.split("memory estimate per GPU", 1)[0]
    nemo_torchrun = next(line for line in script.splitlines()
                         if line.startswith("srun ")).split(" torchrun ", 1)[1]

    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "RECIPE": RECIPE,
           "MASA_ROOT": str(REPO)}
    result = subprocess.run(["bash", str(REPO / "slurm/colocated.sbatch"), *OVERRIDES],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    sbatch = sections(result.stdout)
    assert sbatch["resolved config"] == nemo_config
    assert sbatch["torchrun"].strip() == "torchrun " + nemo_torchrun


# ---------------------------------------------------------------- end to end (slow)

def make_tiny_run_inputs(folder: Path) -> tuple[Path, Path]:
    """A tiny random Qwen3 checkpoint with a tokenizer, and the synthetic task's train file."""
    from masa_megatron.data.synthetic import write_task_files
    from masa_megatron.data.tiny_tokenizer import make_tiny_tokenizer
    from masa_megatron.demo.warmstart_data import tokenizer_corpus
    from masa_megatron.model.tiny import make_tiny_hf_model

    model = folder / "tiny-qwen3"
    tokenizer = make_tiny_tokenizer(tokenizer_corpus(n=200), vocab_size=400)
    make_tiny_hf_model(model, "qwen3", vocab_size=len(tokenizer), max_position_embeddings=1024,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    tokenizer.save_pretrained(str(model))
    train, _ = write_task_files(folder / "data", n_train=32, n_eval=8)
    return model, train


@pytest.mark.slow
@needs_nemo_run
@outlasting(900)
def test_tiny_recipe_trains_through_nemo_run_local_executor(tmp_path):
    try:
        importlib.import_module("masa_megatron.train.main")
    except ImportError:
        pytest.skip("training entry point not available")
    model, train = make_tiny_run_inputs(tmp_path)
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "recipes.launch", "tiny_cpu_grpo", "--executor", "local",
         f"model.hf_path={model}", f"data.train_files=[{train}]", f"trainer.output_dir={out}"],
        cwd=REPO, env={**os.environ, "NEMORUN_HOME": str(tmp_path / "nemorun")},
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert list(out.rglob("*.jsonl")), f"no metrics written under {out}"

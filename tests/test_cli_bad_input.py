"""Standing guard: bad input through the `masa` command, as a user types it.

Each row of CASES runs one command in a subprocess and expects exit code 2, exactly one error
line that names the field or file (every string of the row's `names`), no traceback, and an
answer within LIMIT_S. A new command or a new kind of bad input joins by adding a row: a
function of the shared fixtures returning the arguments after `masa` and the names to expect.
"""
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import yaml

pytest.importorskip("megatron.core")

REPO = Path(__file__).resolve().parents[1]
LIMIT_S = 90.0


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable          # fx -> (argv after `masa`, names the error line must contain)
    absent: tuple = ()      # strings the error line must not contain
    marks: tuple = field(default_factory=tuple)


def masa(argv, timeout=LIMIT_S + 30):
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "masa_megatron.cli", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                               "TOKENIZERS_PARALLELISM": "false"})
    return proc, time.monotonic() - started


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    from masa_megatron.data.tiny_tokenizer import make_tiny_tokenizer
    from masa_megatron.model.convert_cli import hf_to_megatron_main
    from masa_megatron.model.tiny import make_tiny_hf_model

    root = tmp_path_factory.mktemp("cli")
    problems = [f"Compute {a} + {b}." for a in range(1, 4) for b in range(1, 4)]
    model = root / "model"
    tokenizer = make_tiny_tokenizer(problems * 3, vocab_size=300)
    tokenizer.save_pretrained(str(model))
    make_tiny_hf_model(model, "qwen3", vocab_size=len(tokenizer), max_position_embeddings=256,
                       bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    bare = root / "bare"                       # weights and config, no tokenizer
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model / name, bare / name)
    no_template = root / "no_template"
    shutil.copytree(model, no_template)
    tok_cfg = json.loads((no_template / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    for name in ("chat_template.jinja", "chat_template.json"):
        (no_template / name).unlink(missing_ok=True)
    rows = [{"problem": p, "answer": "0"} for p in problems]
    (root / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "problems.csv").write_text("problem,answer\n1+1,2\n")
    cfg = {"model": {"hf_path": str(model)},
           "rollout": {"max_response_length": 8, "max_prompt_length": 128},
           "grpo": {"group_size": 2}, "masa": {"mode": "grpo"},
           "data": {"train_files": [str(root / "problems.jsonl")], "prompt_batch_size": 2},
           "trainer": {"steps": 1}, "logging": {"progress": False}}
    (root / "exp.yaml").write_text(yaml.safe_dump(cfg))
    mcore = root / "mcore"
    assert hf_to_megatron_main(["--hf", str(model), "--out", str(mcore)]) == 0
    damaged = root / "mcore_damaged"
    shutil.copytree(mcore, damaged)
    shard = sorted(damaged.glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    busy = root / "busy"
    holder = subprocess.Popen([sys.executable, "-m", "tests.support.lock_holder", str(busy)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    count = iter(range(1000))
    yield SimpleNamespace(root=root, model=model, bare=bare, no_template=no_template,
                          problems=root / "problems.jsonl", csv=root / "problems.csv",
                          config=root / "exp.yaml", mcore=mcore, damaged=damaged,
                          shard=shard.name, busy=busy, holder=holder.pid,
                          fresh=lambda: root / f"out{next(count)}")
    holder.kill()
    holder.wait()


def train(fx, *overrides, out=None):
    return ["train", str(fx.config), f"trainer.output_dir={out or fx.fresh()}", *overrides]


def evaluate(fx, *extra, model=None, out=None):
    return ["eval", str(model or fx.model), "--benchmarks", str(fx.problems), "--n", "2",
            "--meta-n", "0", "--max-tokens", "4", "--no-progress", "--out",
            str(out or fx.fresh()), *extra]


def _eval_results_of_other_settings(fx):
    from masa_megatron.eval.benchmarks import load_benchmarks
    from masa_megatron.eval.manifest import build_manifest, claim_output
    from masa_megatron.eval.run import _parse
    out = fx.fresh()
    earlier = _parse(evaluate(fx, "--n", "4", out=out)[1:])
    claim_output(out, build_manifest(earlier, load_benchmarks([str(fx.problems)])), False)
    (out / "results.jsonl").write_text(json.dumps({"id": "problems/0", "scores": [1.0]}) + "\n")
    return evaluate(fx, "--n", "8", out=out), [f"--out {out}", "--n: 4 -> 8", "--restart"]


def _eval_results_without_manifest(fx):
    out = fx.fresh()
    out.mkdir()
    (out / "results.jsonl").write_text(json.dumps({"id": "problems/0", "scores": [1.0]}) + "\n")
    return evaluate(fx, out=out), [f"--out {out}", "without manifest.json", "--restart"]


def _train_resume_of_damaged_checkpoint(fx):
    out = fx.fresh()
    step = out / "checkpoints" / "step_000001"
    shutil.copytree(fx.damaged, step / "model")
    (step / "COMPLETE").write_text("1\n")
    return train(fx, out=out), [f"{step} is damaged", f"model/{fx.shard}",
                                "checkpoint.resume=none"]


def _free_url():
    from masa_megatron.ports import free_port
    return f"http://127.0.0.1:{free_port()}"


def _train_attached_to_a_dead_sglang_url(fx):
    url = _free_url()
    return (train(fx, "rollout.engine=sglang", f"rollout.sglang_urls=[{url}]"),
            [url, "connection refused", "rollout.sglang_urls"])


def _existing_out(fx):
    out = fx.fresh()
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    return out


CASES = [
    Case("eval_results_of_other_settings", _eval_results_of_other_settings),
    Case("eval_results_without_manifest", _eval_results_without_manifest),
    Case("eval_out_in_use", lambda fx: (evaluate(fx, out=fx.busy),
                                        [f"--out {fx.busy}", f"pid {fx.holder}"])),
    Case("eval_model_without_tokenizer", lambda fx: (evaluate(fx, model=fx.bare),
                                                     [str(fx.bare), "no tokenizer"])),
    Case("train_output_dir_in_use", lambda fx: (train(fx, out=fx.busy),
                                                [f"trainer.output_dir {fx.busy}",
                                                 f"pid {fx.holder}"])),
    Case("train_model_without_tokenizer",
         lambda fx: (train(fx, f"model.hf_path={fx.bare}"),
                     [f"model.hf_path {fx.bare}", "no tokenizer"])),
    Case("train_model_without_chat_template",
         lambda fx: (train(fx, f"model.hf_path={fx.no_template}"),
                     [f"model.hf_path {fx.no_template}", "no chat template"])),
    Case("train_data_file_of_another_format",
         lambda fx: (train(fx, f"data.train_files=[{fx.csv}]"),
                     [f"data.train_files[0] {fx.csv}", ".jsonl"]), absent=("benchmark",)),
    Case("train_resume_of_damaged_checkpoint", _train_resume_of_damaged_checkpoint),
    Case("train_attached_to_a_dead_sglang_url", _train_attached_to_a_dead_sglang_url),
    Case("hf2mcore_into_existing_out",
         lambda fx: (["convert", "hf2mcore", "--hf", str(fx.model), "--out",
                      str(out := _existing_out(fx))], [f"--out {out}", "--overwrite"])),
    Case("mcore2hf_into_existing_out",
         lambda fx: (["convert", "mcore2hf", "--ckpt", str(fx.mcore), "--out",
                      str(out := _existing_out(fx))], [f"--out {out}", "--overwrite"]),
         absent=("overwrite=True",)),
    Case("mcore2hf_of_truncated_shard",
         lambda fx: (["convert", "mcore2hf", "--ckpt", str(fx.damaged), "--out",
                      str(fx.fresh())], [f"checkpoint {fx.damaged} is damaged", fx.shard])),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_is_one_line_naming_it_with_exit_code_2(fx, case):
    argv, names = case.make(fx)
    proc, seconds = masa(argv)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    context = f"masa {' '.join(argv)}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 2, context
    assert "Traceback" not in proc.stderr, context
    assert len(errors) == 1, context
    for name in names:
        assert name in errors[0], f"{name!r} not named in: {errors[0]}"
    for text in case.absent:
        assert text not in errors[0], errors[0]
    assert seconds < LIMIT_S, f"{seconds:.0f} s: {context}"


@pytest.mark.slow
def test_tensor_parallel_size_that_does_not_divide_the_heads_is_a_config_error(fx, tmp_path):
    """Under torchrun each rank says it in one line instead of a Megatron assertion (torchrun
    itself then reports the failed ranks)."""
    from masa_megatron.model.tiny import make_tiny_hf_model
    from masa_megatron.ports import free_port
    model = tmp_path / "three_heads"
    make_tiny_hf_model(model, "qwen3", num_attention_heads=3, num_key_value_heads=3)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", "-m", "masa_megatron.cli", "convert", "hf2mcore", "--hf",
           str(model), "--out", str(tmp_path / "mcore"), "--tp", "2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=LIMIT_S,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0
    assert errors and all("num_attention_heads=3 is not divisible by the tensor-parallel size 2"
                          in line for line in errors), proc.stderr[-3000:]
    assert "AssertionError" not in proc.stderr, proc.stderr[-3000:]

"""Shared by the model/compat tests and the scripts they launch with torchrun.

Cases are tiny random HF checkpoints (vocab 1003, so TP=2 needs vocabulary padding): Llama with
and without Llama-3 rope scaling, Qwen2 (qkv bias), Qwen3 with tied embeddings (q/k norm).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from masa_megatron.model.tiny import LLAMA3_ROPE, make_tiny_hf_model

CASES = {
    "llama": dict(family="llama"),
    "llama3_rope": dict(family="llama", rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "qwen2": dict(family="qwen2"),
    "qwen3_tied": dict(family="qwen3", tied=True),
}
VOCAB = 1003
BATCH, SEQ = 2, 24


def input_ids(seed: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def make_cases(workdir: Path) -> dict[str, Path]:
    """Save every case's HF checkpoint and its transformers logits on `input_ids()`."""
    folders = {}
    for i, (name, kwargs) in enumerate(CASES.items()):
        folder = workdir / name
        kwargs = dict(kwargs)
        hf = make_tiny_hf_model(folder, kwargs.pop("family"), seed=i, **kwargs)
        with torch.no_grad():
            torch.save(hf(input_ids()).logits, folder / "ref_logits.pt")
        if name == "llama":
            save_tiny_tokenizer(folder)
        folders[name] = folder
    return folders


def save_tiny_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over VOCAB made-up words (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(folder))


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp)]
    torch.distributed.all_gather(parts, logits.contiguous(),
                                 group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _positions(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)


def megatron_logits(model, ids: torch.Tensor):
    """Full-vocabulary logits [b, s, vocab] on the last pipeline stage, None elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    stash = {}

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        out = chunk(batch, _positions(batch), attention_mask=None)

        def keep(output):
            stash["logits"] = _gather_vocab(output.detach())
            return output.sum() * 0.0, {}
        return out, keep

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([ids]), model=[model],
        num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=ids.shape[0],
        forward_only=True)
    logits = stash.get("logits")
    return None if logits is None else logits[..., :VOCAB]


def train_losses(model, steps: int = 4, lr: float = 1e-2) -> list[float]:
    """Adam steps on a fixed batch through Megatron's DDP, optimizer and 1F1B schedule.

    Returns the mean next-token loss per step (on every rank: broadcast from the last stage)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = model.config
    ddp = DistributedDataParallel(config=config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False))
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.0, clip_grad=1.0,
                        params_dtype=torch.float32, use_distributed_optimizer=False), [ddp])
    tokens = torch.randint(0, VOCAB, (4, SEQ + 1), generator=torch.Generator().manual_seed(3))
    micro = [(tokens[i:i + 2, :-1], tokens[i:i + 2, 1:]) for i in (0, 2)]

    def forward_step(data_iterator, chunk):
        ids, labels = next(data_iterator)
        per_token = chunk(ids, _positions(ids), attention_mask=None, labels=labels)

        def loss_func(output):
            logged = output.detach().double().mean()  # float64 sum: no rounding of its own
            return output.float().mean(), {"loss": logged}
        return per_token, loss_func

    losses = []
    for _ in range(steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro), model=[ddp],
            num_microbatches=len(micro), seq_length=SEQ, micro_batch_size=2, forward_only=False)
        optimizer.step()
        loss = torch.tensor(0.0, dtype=torch.float64)
        if ps.is_pipeline_last_stage():
            loss = torch.stack([r["loss"] for r in reduced]).mean()
        if ps.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.broadcast(loss, src=ps.get_pipeline_model_parallel_last_rank(),
                                        group=ps.get_pipeline_model_parallel_group())
        losses.append(loss.item())
    return losses


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF safetensors folder."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def assert_bit_exact(original: Path, exported: Path) -> None:
    want, got = hf_tensors(original), hf_tensors(exported)
    assert sorted(got) == sorted(want), (set(got) ^ set(want))
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


# ---------------------------------------------------------------- cached runs shared by tests

TRAIN_CASES = ("llama", "qwen3_tied")
_CACHE: dict = {}


def _scratch() -> Path:
    if "scratch" not in _CACHE:
        import atexit
        import shutil
        import tempfile

        path = Path(tempfile.mkdtemp(prefix="masa_model_tests_"))
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        _CACHE["scratch"] = path
    return _CACHE["scratch"]


def shared_cases() -> Path:
    """The case checkpoints, made once per test session."""
    if "cases" not in _CACHE:
        make_cases(_scratch() / "cases")
        _CACHE["cases"] = _scratch() / "cases"
    return _CACHE["cases"]


def tp1_results() -> dict:
    """In this process at TP=PP=1: logits diff, fp32 export and losses per case (once)."""
    if "tp1" not in _CACHE:
        from masa_megatron.config import ModelConfig, ParallelConfig
        from masa_megatron.model import build_gpt_model, export_hf_checkpoint, load_hf_weights
        from masa_megatron.parallel import destroy_parallel, init_parallel

        cases, out = shared_cases(), _scratch() / "tp1"
        results = {}
        init_parallel(ParallelConfig())
        try:
            for case in CASES:
                model = build_gpt_model(cases / case, ModelConfig(hf_path=str(cases / case)))
                load_hf_weights(model, cases / case)
                logits = megatron_logits(model, input_ids())
                results[case] = {"max_logit_diff": (logits - torch.load(
                    cases / case / "ref_logits.pt")).abs().max().item()}
                export_hf_checkpoint(model, out / "export" / case, dtype="fp32",
                                     source_dir=cases / case)
                if case in TRAIN_CASES:
                    results[case]["losses"] = train_losses(model)
        finally:
            destroy_parallel()
        _CACHE["tp1"] = (results, out)
    return _CACHE["tp1"][0]


def tp1_export(case: str) -> Path:
    tp1_results()
    return _CACHE["tp1"][1] / "export" / case


def launch_layout(tp: int, pp: int) -> tuple[dict, Path]:
    """One torchrun launch (2 processes, gloo) of layout_check.py; results and output folder."""
    key = f"tp{tp}pp{pp}"
    if key not in _CACHE:
        import subprocess
        import sys

        from masa_megatron.ports import free_port

        out = _scratch() / key
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={free_port()}", str(Path(__file__).parent / "layout_check.py"),
               "--tp", str(tp), "--pp", str(pp), "--cases-dir", str(shared_cases()),
               "--out", str(out), "--train-cases", ",".join(TRAIN_CASES)]
        if tp > 1:
            cmd.append("--save-dist")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n"
                               f"{proc.stderr[-8000:]}")
        _CACHE[key] = (json.loads((out / "results.json").read_text()), out)
    return _CACHE[key]

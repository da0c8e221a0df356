"""`masa eval` end to end on a tiny random model and 10 real problems from the shared files."""
import json
import shutil

import pytest

from masa_megatron.data.tiny_tokenizer import make_tiny_tokenizer
from masa_megatron.eval.benchmarks import load_benchmark
from masa_megatron.errors import UserError
from masa_megatron.eval.run import _parse, evaluate, load_policy
from masa_megatron.model.tiny import make_tiny_hf_model
from masa_megatron.config import ParallelConfig
from masa_megatron.parallel import destroy_parallel, init_parallel

REPORT_FILES = ("results.jsonl", "report.json", "summary.md", "calibration.png",
                "pass_rate_scatter.png", "length_scatter.png", "pass_at_k.png")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, shared_data):
    folder = tmp_path_factory.mktemp("eval_policy")
    texts = [p.problem for p in load_benchmark("amc23", shared_data).problems]
    tokenizer = make_tiny_tokenizer(texts, vocab_size=400)
    tokenizer.save_pretrained(str(folder))
    make_tiny_hf_model(folder, "qwen3", vocab_size=len(tokenizer), max_position_embeddings=4096,
                       bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    return folder


@pytest.fixture
def policy(policy_dir):
    init_parallel(ParallelConfig(), seed=0)
    yield load_policy(policy_dir)
    destroy_parallel()


def args_for(policy_dir, out, shared_data, *extra):
    return _parse([str(policy_dir), "--benchmarks", "amc23", "--limit", "10", "--n", "3",
                   "--meta-n", "2", "--max-tokens", "6", "--max-prompt-tokens", "4000",
                   "--temperature", "1.0", "--problems-per-batch", "4", "--out", str(out),
                   "--data-dir", str(shared_data), "--no-progress", *extra])


def test_eval_writes_every_report_file(policy, policy_dir, tmp_path, shared_data):
    report = evaluate(policy, args_for(policy_dir, tmp_path / "a", shared_data),
                      log=lambda m: None)
    for name in REPORT_FILES:
        assert (tmp_path / "a" / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (tmp_path / "a" / "results.jsonl").open()]
    assert len(records) == 10 and all(len(r["scores"]) == 3 for r in records)
    assert report["overall"]["n_problems"] == 10
    assert report["benchmarks"]["amc23"]["pass_at_k"]["1"]["mean"] is not None


def test_resumed_eval_equals_uninterrupted(policy, policy_dir, tmp_path, shared_data):
    evaluate(policy, args_for(policy_dir, tmp_path / "full", shared_data), log=lambda m: None)
    full = (tmp_path / "full" / "results.jsonl").read_text().splitlines()
    interrupted = tmp_path / "part"
    interrupted.mkdir()
    shutil.copy(tmp_path / "full" / "manifest.json", interrupted / "manifest.json")
    # 4 problems finished, the 5th cut mid-line by the crash
    (interrupted / "results.jsonl").write_text("\n".join(full[:4]) + "\n" + full[4][:40])
    evaluate(policy, args_for(policy_dir, interrupted, shared_data), log=lambda m: None)
    resumed = (interrupted / "results.jsonl").read_text().splitlines()
    by_id = lambda lines: {json.loads(x)["id"]: json.loads(x) for x in lines}  # noqa: E731
    assert by_id(resumed) == by_id(full)
    assert json.loads((interrupted / "report.json").read_text()) == \
        json.loads((tmp_path / "full" / "report.json").read_text())


def test_reference_protocol_eval_on_amc23_writes_its_report(policy, policy_dir, tmp_path,
                                                            shared_data):
    """`masa eval --protocol reference`: bare problem prompts, the Qwen-Math answer fallback,
    the paper's amc23 suite name; a few problems, small max tokens."""
    from masa_megatron.eval.run import eval_config
    args = _parse([str(policy_dir), "--benchmarks", "amc23", "--protocol", "reference",
                   "--limit", "3", "--n", "2", "--meta-n", "2", "--max-tokens", "6",
                   "--max-prompt-tokens", "4000", "--problems-per-batch", "3",
                   "--out", str(tmp_path / "ref"), "--data-dir", str(shared_data),
                   "--no-progress"])
    assert (args.suffix, args.answer_fallback) == ("off", "qwen_math")
    assert eval_config(args, policy_dir).data.solution_suffix is False
    report = evaluate(policy, args, log=lambda m: None)
    for name in REPORT_FILES:
        assert (tmp_path / "ref" / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (tmp_path / "ref" / "results.jsonl").open()]
    assert [r["id"] for r in records] == ["amc23/0", "amc23/1", "amc23/2"]
    assert report["benchmarks"]["amc23"]["n_problems"] == 3


QUICK = ("--limit", "2", "--meta-n", "0")


def test_eval_into_a_folder_of_another_model_stops_naming_the_model(policy, policy_dir, tmp_path,
                                                                     shared_data):
    out = tmp_path / "out"
    evaluate(policy, args_for(policy_dir, out, shared_data, *QUICK), log=lambda m: None)
    other = tmp_path / "other_model"
    shutil.copytree(policy_dir, other)
    make_tiny_hf_model(other, "qwen3", seed=5, vocab_size=len(policy[1]),
                       max_position_embeddings=4096, bos_token_id=None,
                       eos_token_id=policy[1].eos_token_id)
    before = (out / "results.jsonl").read_text()
    with pytest.raises(UserError, match=rf"--out {out}: its results come from another "
                                        rf"evaluation \(model: "):
        evaluate(policy, args_for(other, out, shared_data, *QUICK), log=lambda m: None)
    assert (out / "results.jsonl").read_text() == before


def test_eval_with_other_settings_stops_naming_them_unless_restart(policy, policy_dir, tmp_path,
                                                                   shared_data):
    out = tmp_path / "out"
    evaluate(policy, args_for(policy_dir, out, shared_data, *QUICK), log=lambda m: None)
    with pytest.raises(UserError, match=r"--n: 3 -> 4; --temperature: 1.0 -> 0.5\)"):
        evaluate(policy, args_for(policy_dir, out, shared_data, *QUICK, "--n", "4",
                                  "--temperature", "0.5"), log=lambda m: None)
    evaluate(policy, args_for(policy_dir, out, shared_data, *QUICK, "--n", "4", "--restart"),
             log=lambda m: None)
    records = [json.loads(line) for line in (out / "results.jsonl").open()]
    assert len(records) == 2 and all(len(r["scores"]) == 4 for r in records)


def test_results_without_a_manifest_are_not_reused(policy, policy_dir, tmp_path, shared_data):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text(json.dumps({"id": "amc23/0", "scores": [1.0]}) + "\n")
    with pytest.raises(UserError, match="without manifest.json"):
        evaluate(policy, args_for(policy_dir, out, shared_data, *QUICK), log=lambda m: None)

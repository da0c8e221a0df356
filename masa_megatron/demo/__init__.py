"""The CPU demo: a synthetic arithmetic task (`masa_megatron.data.synthetic`), warm-start SFT data
and a tiny Qwen3 config (`warmstart_data`), used by `masa demo` to compare grpo, masa and
masa_efficient with real training on a laptop CPU."""

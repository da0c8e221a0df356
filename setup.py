"""masa-megatron: MASA (meta-awareness via self-alignment) RL on Megatron-core."""
from setuptools import find_packages, setup

SGLANG = "0.5.23"
SGLANG_ROUTER = "0.3.2"

CORE = [
    "torch>=2.4",
    # 0.16.1 is what Python 3.11 resolves; 0.19.x is what Python 3.12 clusters get. Both are tested.
    "megatron-core>=0.16.1,<0.20",
    "omegaconf>=2.3",
    "transformers>=4.51",
    "tokenizers>=0.21",
    "safetensors>=0.4",
    "pyarrow>=15",
    "math-verify[antlr4_13_2]>=0.7",
    "psutil>=5.9",
    "tqdm>=4.66",
    "tensorboard>=2.15",
    "matplotlib>=3.8",
    "aiohttp>=3.9",
]

EXTRAS = {
    # SGLang pinned exactly: request schemas, launch flags and weight-sync payloads are checked
    # against this version's own classes (tests/test_sglang_contract.py, docs/sglang.md).
    "gpu": ["transformer-engine[pytorch]>=2.0", f"sglang=={SGLANG}", f"sglang-router=={SGLANG_ROUTER}"],
    "launch": ["nemo-run>=0.5", "leptonai<0.47"],
    "dev": ["pytest>=8", "hypothesis>=6.100", "pytest-timeout>=2.3", "ruff>=0.5"],
    "wandb": ["wandb>=0.17"],
    "bench": ["trl==1.16.0"],
}

setup(
    name="masa-megatron",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=find_packages(include=["masa_megatron", "masa_megatron.*", "recipes", "recipes.*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["masa=masa_megatron.cli:main"]},
)

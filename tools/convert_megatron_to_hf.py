#!/usr/bin/env python
"""Megatron distributed checkpoint (any TP/PP) -> HF safetensors folder (`--help` for options)."""
import sys

from masa_megatron.model.convert_cli import megatron_to_hf_main as main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""HF safetensors folder -> Megatron distributed checkpoint (`--help` for options)."""
import sys

from masa_megatron.model.convert_cli import hf_to_megatron_main as main

if __name__ == "__main__":
    sys.exit(main())

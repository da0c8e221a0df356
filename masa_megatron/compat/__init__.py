"""Compatibility layers: the CPU shim for Megatron-core and Megatron-core version differences."""
from masa_megatron.compat.cpu import (
    apply_cpu_compat, ensure_mode_on_this_thread, is_applied, trim_host_memory)

__all__ = ["apply_cpu_compat", "ensure_mode_on_this_thread", "is_applied", "trim_host_memory"]

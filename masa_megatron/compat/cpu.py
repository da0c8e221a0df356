"""Let Megatron-core run on a machine without CUDA.

Megatron calls CUDA unconditionally in many places (`torch.cuda.current_device()`, hard-coded
`device="cuda"`, the CUDA RNG tracker, streams, events, nvtx). `apply_cpu_compat()` patches, only
when `torch.cuda.is_available()` is False, and only what exists in the installed versions:

- `torch.cuda`: `current_device()` returns "cpu"; `synchronize`, `set_device`, `manual_seed*`,
  `empty_cache` and nvtx ranges become no-ops; `Event`, `Stream`, `current_stream`,
  `default_stream`, `stream` become inert stand-ins; memory counters return 0.
- Megatron's tensor-parallel RNG tracker: `add`/`fork` keep their named states on the CPU default
  generator (fork = swap the generator state in, run, swap it back out), and the module helpers
  `_get_cuda_rng_state`/`_set_cuda_rng_state` (used by activation recompute) read/write it too.
- A torch function mode, entered for good on the importing thread, rewrites `device="cuda..."`
  keyword arguments and `.to("cuda")` to the CPU, makes `.cuda()` and `.pin_memory()` identities,
  and reports `Tensor.type()` as `torch.cuda.*` so Megatron's type asserts pass.

It is idempotent: a second call does nothing. Nothing here runs when CUDA is present.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_LOCK = threading.Lock()
_MODE: "CudaToCpuMode | None" = None


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class CudaToCpuMode(TorchFunctionMode):
    """Torch function mode that turns CUDA placement requests into CPU ones."""

    _IDENTITY = {torch.Tensor.cuda, torch.Tensor.pin_memory}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self._IDENTITY:
            return args[0]
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
        result = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs \
                and isinstance(result, str) and not result.startswith("torch.cuda."):
            return "torch.cuda." + result[len("torch."):]
        return result


class _InertEvent:
    """Stand-in for torch.cuda.Event: recording and waiting do nothing; timings are 0."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        return None

    def wait(self, *args, **kwargs):
        return None

    def synchronize(self):
        return None

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


class _InertStream(_InertEvent):
    """Stand-in for torch.cuda.Stream; also usable as its own `with torch.cuda.stream(s)`."""

    device = torch.device("cpu")

    def wait_stream(self, *args, **kwargs):
        return None

    def wait_event(self, *args, **kwargs):
        return None

    def record_event(self, *args, **kwargs):
        return _InertEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_DEFAULT_STREAM = _InertStream()


def _returning(value):
    """A new function object per patched name (torch._dynamo rejects one object under two names)."""
    def stand_in(*args, **kwargs):
        return value
    return stand_in


_noop = _returning(None)


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    replacements = {
        "current_device": _returning("cpu"),
        "synchronize": _returning(None),
        "set_device": _returning(None),
        "manual_seed": _returning(None),
        "manual_seed_all": _returning(None),
        "empty_cache": _returning(None),
        "Event": _InertEvent,
        "Stream": _InertStream,
        "ExternalStream": type("_InertExternalStream", (_InertStream,), {}),
        "current_stream": _returning(_DEFAULT_STREAM),
        "default_stream": _returning(_DEFAULT_STREAM),
        "stream": lambda s=None: contextlib.nullcontext(s),
        "set_stream": _returning(None),
        "memory_allocated": _returning(0),
        "max_memory_allocated": _returning(0),
        "memory_reserved": _returning(0),
        "max_memory_reserved": _returning(0),
        "reset_peak_memory_stats": _returning(None),
    }
    for name, value in replacements.items():
        if hasattr(cuda, name):
            setattr(cuda, name, value)
    nvtx = getattr(cuda, "nvtx", None)
    if nvtx is not None:
        for name in ("range_push", "range_pop", "mark"):
            if hasattr(nvtx, name):
                setattr(nvtx, name, _returning(None))
        if hasattr(nvtx, "range"):
            nvtx.range = lambda *a, **k: contextlib.nullcontext()


def _patch_rng_tracker() -> None:
    try:
        from megatron.core.tensor_parallel import random as mrandom
    except ImportError:
        return
    default_name = getattr(mrandom, "_MODEL_PARALLEL_RNG_TRACKER_NAME", "model-parallel-rng")

    def get_state(*args, **kwargs):
        return torch.get_rng_state()

    def set_state(new_state, *args, **kwargs):
        torch.set_rng_state(new_state)

    def add(self, name, seed):
        """Store the CPU generator state seeded with `seed` under `name`."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name=default_name):
        """Run the body with the CPU generator in state `name`; keep its advanced state."""
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

    for helper, value in (("_get_cuda_rng_state", get_state), ("_set_cuda_rng_state", set_state)):
        if hasattr(mrandom, helper):
            setattr(mrandom, helper, value)
    tracker_cls = getattr(mrandom, "CudaRNGStatesTracker", None)
    if tracker_cls is not None:
        tracker_cls.add = add
        tracker_cls.fork = fork


def _patch_mask_helpers() -> None:
    """Megatron's causal-mask helpers name device="cuda"; the softmax calls them on every forward,
    inside `hot_path()` where the mode is lifted, so they get CPU versions (same masks)."""
    try:
        from megatron.core.fusions import fused_softmax
    except ImportError:
        return

    def causal_mask(sq):
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    def sliding_window_mask(sq, skv, window_size):
        upper = torch.triu(torch.ones(sq, skv, dtype=torch.bool), diagonal=skv - sq - window_size[0])
        return ~torch.tril(upper, diagonal=skv - sq + window_size[1])

    for name, value in (("get_default_causal_mask", causal_mask),
                        ("get_sliding_window_causal_mask", sliding_window_mask)):
        if hasattr(fused_softmax, name):
            setattr(fused_softmax, name, value)


def _import_megatron_without_compile() -> None:
    """Import megatron.core with its `jit_fuser` (= torch.compile) as the identity.

    Megatron decorates its fusion kernels with torch.compile at import time, which loads
    torch._dynamo/_inductor (seconds per process) for kernels the CPU configuration never calls
    (the fusions are switched off there); eager code computes the same thing."""
    if "megatron.core" in sys.modules:
        return
    original = torch.compile

    def identity_compile(model=None, **kwargs):
        return model if model is not None else (lambda fn: fn)

    torch.compile = identity_compile
    try:
        import megatron.core  # noqa: F401
        from megatron.core import jit
    except ImportError:
        return
    finally:
        torch.compile = original
    if hasattr(jit, "disable_jit_fuser"):
        jit.disable_jit_fuser()


def _enter_mode() -> None:
    global _MODE
    _MODE = CudaToCpuMode()
    _MODE.__enter__()


def hot_path():
    """Context that lifts the torch function mode (not the other patches) around model compute.

    The mode costs a Python call per torch op (~20 % of a demo step's CPU time). A GPTModel
    forward and the embedded engine's decode loop place nothing on "cuda" by name (devices come
    from the patched `torch.cuda.current_device()`), so they run without it; Megatron's schedules
    and setup code, which do name "cuda", keep it. A null context when the patches are off."""
    return torch._C.DisableTorchFunction() if _APPLIED else contextlib.nullcontext()


def ensure_mode_on_this_thread() -> None:
    """The function mode is thread-local: call this first in a thread that runs Megatron code."""
    if _APPLIED and not any(isinstance(m, CudaToCpuMode) for m in _active_modes()):
        CudaToCpuMode().__enter__()


def _active_modes() -> list:
    from torch.overrides import _get_current_function_mode_stack
    return list(_get_current_function_mode_stack())


def trim_host_memory() -> None:
    """Return freed heap memory to the OS (glibc `malloc_trim`); a no-op elsewhere.

    Megatron's CPU weight initialisation and slice reads free many large temporaries that glibc
    keeps in the heap; trimming after model build/load keeps RSS near the live tensors."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def is_applied() -> bool:
    return _APPLIED


def apply_cpu_compat(force: bool = False) -> bool:
    """Patch torch.cuda and Megatron for CPU-only runs. Returns True when the patches are active.

    Does nothing (returns False) when CUDA is available, unless `force` (tests only)."""
    global _APPLIED
    with _LOCK:
        if _APPLIED:
            return True
        if torch.cuda.is_available() and not force:
            return False
        _import_megatron_without_compile()
        _patch_rng_tracker()
        _patch_mask_helpers()
        _patch_torch_cuda()
        _enter_mode()
        _APPLIED = True
        return True

"""A stand-in for an SGLang server (the version pinned in setup.py), for CPU tests.

server.py serves SGLang's HTTP API (schemas.py) from a real tiny Megatron model (backend.py) or an
echo backend, decodes tensor payloads like SGLang (payload.py) and injects faults (faults.py).
`start_standin` launches it through the project's own launcher, exactly as the engine launches
`sglang.launch_server`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
STANDIN_MODULE = "tests.sglang_standin.server"


def standin_env() -> dict:
    """Environment for the server process: the repository root importable, one thread."""
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), path) if p),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def start_standin(model_path: str, *, backend: str = "model", port: Optional[int] = None,
                  extra_args: Sequence[str] = (), log_dir: Optional[str] = None,
                  health_timeout_s: float = 120.0, wait: bool = True):
    """One stand-in server started by masa's launcher (and health-checked unless `wait` is
    False: then call `wait_healthy(proc.url, ...)` later); `.url`, `.stop()`."""
    import tempfile

    from masa_megatron.ports import free_port
    from masa_megatron.rollout.sglang_launch import (ManagedProcess, ServerOptions, launch_servers,
                                                     server_command)

    opts = ServerOptions(model_path=str(model_path), port=port or free_port(),
                         module=STANDIN_MODULE, env=standin_env(),
                         extra_args=["--backend", backend, *extra_args])
    if wait:
        return launch_servers(opts, 1, health_timeout_s=health_timeout_s, log_dir=log_dir)[0]
    log = Path(log_dir or tempfile.mkdtemp(prefix="masa-standin-")) / "server-0.log"
    proc = ManagedProcess("sglang-standin", server_command(opts), log, env=opts.env)
    proc.url = opts.url
    return proc

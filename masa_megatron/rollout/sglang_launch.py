"""SGLang servers and sglang-router: command lines, processes, and the HTTP client to them.

Pinned to sglang 0.5.23 (flags of python/sglang/srt/server_args.py, parsed by its parser in CI):
`python -m sglang.launch_server --model-path P --tp-size N --mem-fraction-static F --host H
--port P --base-gpu-id G --random-seed S --skip-tokenizer-init [--enable-memory-saver]
[--dtype D] [--enable-deterministic-inference]`. RL needs: `--skip-tokenizer-init` (we send
input_ids and read output_ids, so the server never detokenises), `--enable-memory-saver` when
colocated (makes /release_memory_occupation and /resume_memory_occupation work),
`--enable-deterministic-inference` for per-request `sampling_seed` to be honoured.
sglang-router 0.3.2: `python -m sglang_router.launch_router --worker-urls U1 U2 ...
--host H --port P --policy cache_aware`.

HTTP: `HTTPClient` runs aiohttp on a private event-loop thread (sync callers get results or
futures); every call has a timeout, and connection errors, timeouts and HTTP 5xx are retried with
exponential backoff and jitter before an EngineError names the server, route and last failure.

Processes: each starts in its own session (so its own process group, which also holds SGLang's
scheduler/detokenizer children); stdout and stderr go to a log file whose tail is quoted in
errors. `ManagedProcess.stop` sends SIGTERM to the whole group, waits `grace_s`, then SIGKILL.
`stop_all` runs at interpreter exit, and on Linux each child gets PR_SET_PDEATHSIG(SIGTERM), so
nothing outlives a trainer that is killed outright.
"""
from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional, Sequence

from masa_megatron.errors import UserError
from masa_megatron.lifecycle import die_with_parent

log = logging.getLogger(__name__)

SERVER_MODULE = "sglang.launch_server"
ROUTER_MODULE = "sglang_router.launch_router"


class EngineError(UserError):
    """A rollout server failed or could not be reached; the message names the server URL."""


@dataclass
class ServerOptions:
    """One SGLang server process (fields map 1:1 to launch_server flags)."""
    model_path: str
    tp: int = 1
    mem_fraction: float = 0.7
    host: str = "127.0.0.1"
    port: int = 30000
    base_gpu_id: int = 0
    memory_saver: bool = False          # colocated with training: --enable-memory-saver
    seed: int = 0
    dtype: str = "auto"
    deterministic: bool = False
    context_length: Optional[int] = None
    extra_args: Sequence[str] = ()
    module: str = SERVER_MODULE         # tests point this at the stand-in server
    python: str = sys.executable
    env: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}"


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


PLACEMENT_FLAGS = ("--host", "--port", "--base-gpu-id")   # set per server by who starts it


def server_flags(opts: ServerOptions, placement: bool = True) -> list[str]:
    """launch_server's flags for `opts`; without `placement` (host, port, first GPU), as
    slurm/sglang_node.sh receives them to place each server itself."""
    flags = ["--model-path", str(opts.model_path), "--tp-size", str(opts.tp),
             "--mem-fraction-static", str(opts.mem_fraction)]
    if placement:
        flags += ["--host", opts.host, "--port", str(opts.port),
                  "--base-gpu-id", str(opts.base_gpu_id)]
    flags += ["--random-seed", str(opts.seed), "--skip-tokenizer-init"]
    if opts.dtype != "auto":
        flags += ["--dtype", opts.dtype]
    if opts.memory_saver:
        flags.append("--enable-memory-saver")
    if opts.deterministic:
        flags.append("--enable-deterministic-inference")
    if opts.context_length:
        flags += ["--context-length", str(opts.context_length)]
    return flags + [str(a) for a in opts.extra_args]


def server_command(opts: ServerOptions) -> list[str]:
    return [opts.python, "-m", opts.module, *server_flags(opts)]


def router_command(worker_urls: Sequence[str], host: str = "127.0.0.1", port: int = 30100, *,
                   policy: str = "cache_aware", module: str = ROUTER_MODULE,
                   python: str = sys.executable) -> list[str]:
    return [python, "-m", module, "--worker-urls", *worker_urls, "--host", host,
            "--port", str(port), "--policy", policy]


# torchrun's per-rank rendezvous variables: a server started from a rank must not see them, or
# anything in it that initialises torch.distributed from the environment joins the trainer's group
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                  "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR",
                  "MASTER_PORT")


def without_rank_variables(environ: Any) -> dict:
    return {k: v for k, v in environ.items()
            if k not in RANK_VARIABLES and not k.startswith("TORCHELASTIC_")}


_LIVE: "weakref.WeakSet[ManagedProcess]" = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


class ManagedProcess:
    """A child process in its own process group, logging to `log_path`."""

    def __init__(self, name: str, cmd: Sequence[str], log_path: Path, env: Optional[dict] = None):
        self.name, self.cmd, self.log_path = name, list(cmd), Path(log_path)
        self.url: Optional[str] = None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        full_env = {**without_rank_variables(os.environ), **(env or {})}
        with open(self.log_path, "ab") as out:
            self.popen = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=full_env, start_new_session=True,
                preexec_fn=partial(die_with_parent, signal.SIGTERM)
                if sys.platform.startswith("linux") else None)
        with _LIVE_LOCK:
            _LIVE.add(self)
        log.info("started %s (pid %d): %s; log %s", name, self.popen.pid, " ".join(self.cmd),
                 self.log_path)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, wait up to `grace_s` for all of it, then SIGKILL."""
        with _LIVE_LOCK:
            _LIVE.discard(self)
        pgid = self.popen.pid                      # start_new_session: the group id is the pid
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            self.popen.poll()                      # reap the leader so it stops counting
            if not _group_alive(pgid):
                break
            time.sleep(0.05)
        else:
            log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing", self.name, pgid, grace_s)
            _signal_group(pgid, signal.SIGKILL)
        try:
            self.popen.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=5.0)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_all(grace_s: float = 5.0) -> None:
    """Stop every process this interpreter started that is still tracked (runs at exit)."""
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        proc.stop(grace_s)


atexit.register(stop_all)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def wait_healthy(url: str, timeout_s: float, *, process: Optional[ManagedProcess] = None,
                 path: str = "/health", interval_s: float = 0.5, report_every_s: float = 30.0,
                 refused_limit: Optional[int] = None, say=_say) -> None:
    """Poll GET url+path until HTTP 200. EngineError naming the URL (and quoting the log tail of
    `process`) when it exits first or `timeout_s` passes. Every `report_every_s` it says what it
    waits for and for how long. `refused_limit=k` (a server we attach to, not one we started:
    it will not come up by itself): k refused connections in a row end the wait at once."""
    started = time.monotonic()
    deadline, next_report = started + timeout_s, started + report_every_s
    last, refused = "no answer yet", 0
    while True:
        if process is not None and not process.alive():
            raise EngineError(f"SGLang server {url}: process {process.name} exited with code "
                              f"{process.popen.returncode} before becoming healthy; log "
                              f"{process.log_path}:\n{process.tail()}")
        try:
            with urllib.request.urlopen(url + path, timeout=min(5.0, timeout_s)) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code}"
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            last = f"{type(err).__name__}: {reason}"
            refused = refused + 1 if isinstance(reason, ConnectionRefusedError) else 0
        else:
            refused = 0
        now = time.monotonic()
        if refused_limit is not None and refused >= refused_limit:
            raise EngineError(f"SGLang server {url}: connection refused {refused} times in "
                              f"{now - started:.1f} s; nothing listens there, and a server given "
                              f"in rollout.sglang_urls is not started by us: start it or fix "
                              f"the URL")
        if now >= deadline:
            tail = f"; log {process.log_path}:\n{process.tail()}" if process is not None else ""
            raise EngineError(f"SGLang server {url}: not healthy after {timeout_s:.0f} s "
                              f"(GET {path}: {last}){tail}")
        if now >= next_report:
            say(f"waiting for SGLang server {url}: {now - started:.0f} s of {timeout_s:.0f} s "
                f"(GET {path}: {last})")
            next_report += report_every_s
        time.sleep(interval_s)


ATTACHED_REFUSED_LIMIT = 5     # refused connections in a row before an attached URL is given up


def launch_servers(template: ServerOptions, num_servers: int, *, health_timeout_s: float,
                   log_dir: Optional[str] = None, port_stride: int = 1) -> list[ManagedProcess]:
    """Start `num_servers` servers on consecutive ports and GPU blocks of `tp` and wait until all
    are healthy; on any failure every started process is stopped before the error is raised.
    Returns the processes; `proc.url` is each server's address."""
    log_root = Path(log_dir or tempfile.mkdtemp(prefix="masa-sglang-"))
    procs: list[ManagedProcess] = []
    try:
        for i in range(num_servers):
            opts = ServerOptions(**{**template.__dict__, "port": template.port + i * port_stride,
                                    "base_gpu_id": template.base_gpu_id + i * template.tp})
            proc = ManagedProcess(f"sglang-server-{i}", server_command(opts),
                                  log_root / f"server-{i}.log", env=opts.env)
            proc.url = opts.url
            procs.append(proc)
        for proc in procs:
            wait_healthy(proc.url, health_timeout_s, process=proc)
    except BaseException:
        for proc in procs:
            proc.stop(grace_s=5.0)
        raise
    return procs


def launch_router(worker_urls: Sequence[str], *, host: str, port: int, health_timeout_s: float,
                  log_dir: Optional[str] = None, module: str = ROUTER_MODULE,
                  env: Optional[dict] = None, python: str = sys.executable) -> ManagedProcess:
    log_root = Path(log_dir or tempfile.mkdtemp(prefix="masa-sglang-"))
    proc = ManagedProcess("sglang-router", router_command(worker_urls, host, port, module=module,
                                                          python=python),
                          log_root / "router.log", env=env)
    proc.url = f"http://{_url_host(host)}:{port}"
    try:
        wait_healthy(proc.url, health_timeout_s, process=proc)
    except BaseException:
        proc.stop(grace_s=5.0)
        raise
    return proc


# ---------------------------------------------------------------- HTTP

@dataclass
class Reply:
    """An HTTP answer: status and body (parsed JSON when it is JSON, else text)."""
    url: str
    path: str
    status: int
    body: Any

    def message(self) -> str:
        body = self.body
        if isinstance(body, dict):          # {"success", "message"} or {"error": {"message"}}
            error = body.get("error")
            body = body.get("message") or (error.get("message") if isinstance(error, dict)
                                           else error) or body
        return str(body)[:500]

    def ok(self) -> bool:
        """HTTP 200 and, for SGLang's {success, message} answers, success."""
        return self.status == 200 and not (isinstance(self.body, dict)
                                           and self.body.get("success") is False)

    def check(self) -> "Reply":
        if not self.ok():
            raise EngineError(f"SGLang server {self.url}: POST {self.path} -> HTTP {self.status}: "
                              f"{self.message()}")
        return self


class HTTPClient:
    """aiohttp on a private event-loop thread; sync callers get futures or results.

    Transient failures (connection errors, timeouts, HTTP 5xx) are retried `max_retries` times
    with backoff `backoff_s * 2**k` (capped at `max_backoff_s`, +-25% jitter)."""

    def __init__(self, *, timeout_s: float = 600.0, max_retries: int = 3, backoff_s: float = 0.5,
                 max_backoff_s: float = 8.0, connections: int = 256):
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.connections = connections
        self.stats = {"requests": 0, "retries": 0, "failures": 0}
        self._session = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="masa-sglang-http",
                                        daemon=True)
        self._thread.start()

    async def request(self, url: str, path: str, payload: Any = None, *, method: str = "POST",
                      timeout_s: Optional[float] = None, retries: Optional[int] = None) -> Reply:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.connections + 8))
        retries = self.max_retries if retries is None else retries
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.timeout_s)
        attempt, last = 0, ""
        while True:
            self.stats["requests"] += 1
            try:
                async with self._session.request(method, url + path, json=payload,
                                                 timeout=timeout) as resp:
                    raw = await resp.read()
                    body = _decode(raw)
                    if resp.status < 500:
                        return Reply(url, path, resp.status, body)
                    last = f"HTTP {resp.status}: {str(body)[:300]}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
                last = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                if isinstance(err, asyncio.TimeoutError):
                    last = f"no answer within {timeout.total:.1f} s (timeout)"
            attempt += 1
            if attempt > retries:
                self.stats["failures"] += 1
                raise EngineError(f"SGLang server {url}: {method} {path} failed after {attempt} "
                                  f"attempt(s): {last}")
            self.stats["retries"] += 1
            delay = min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)
            await asyncio.sleep(delay * random.uniform(0.75, 1.25))

    def submit(self, coro):
        """Run a coroutine on the client's loop; returns a concurrent.futures.Future."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro):
        future = self.submit(coro)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def call(self, url: str, path: str, payload: Any = None, **kwargs) -> Reply:
        return self.run(self.request(url, path, payload, **kwargs))

    async def _all(self, urls, path, payload, kwargs) -> list[Reply]:
        return list(await asyncio.gather(*(self.request(u, path, payload, **kwargs) for u in urls)))

    def submit_all(self, urls: Sequence[str], path: str, payload: Any = None, **kwargs):
        """The same call to every URL concurrently; a future of the replies in URL order."""
        return self.submit(self._all(list(urls), path, payload, kwargs))

    def call_all(self, urls: Sequence[str], path: str, payload: Any = None, **kwargs) -> list[Reply]:
        return self.run(self._all(list(urls), path, payload, kwargs))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._session is not None:
            try:
                self.submit(self._session.close()).result(timeout=5)
            except Exception:  # a dead loop or session: nothing left to free
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode(errors="replace")

"""The SGLang rollout engine: launch or attach to SGLang servers, generate over HTTP.

Pinned to sglang 0.5.23 (setup.py; checked by tests/test_sglang_contract.py): schemas from
python/sglang/srt/managers/io_struct.py (GenerateReqInput, AbortReq,
ReleaseMemoryOccupationReqInput, ...), routes from python/sglang/srt/entrypoints/http_server.py,
sampling fields from python/sglang/srt/sampling/sampling_params.py.

Generate: POST /generate {"input_ids", "sampling_params": {"max_new_tokens", "temperature",
"top_p", "top_k", "ignore_eos", "n", "stop_token_ids"?, "sampling_seed"?}, "return_logprob": true,
"rid"} -> {"output_ids", "meta_info": {"id", "finish_reason": {"type": "stop"|"length"|"abort"},
"prompt_tokens", "output_token_logprobs": [[logprob, token_id, null], ...], "weight_version"}}, or
a list of n such objects when n > 1. The server adds the model's EOS ids to the stop set unless
ignore_eos; a stop token is the last output token (finish "stop"), as in rollout/base.py.

Log-probs: SGLang reports log_softmax(z / T)[y] before top-k/top-p truncation, with T = 1 for
greedy requests (temperature 0 becomes top_k = 1): the definition of rollout/base.py.

Seeds: a seeded request goes out as n one-sample requests, sample j with sampling_seed =
mix_seed(seed, j) (the embedded engine's per-sample seed, sent as a signed 64-bit int), because
SGLang seeds by (sampling_seed, position) and n copies under one seed would be identical. It is
honoured by servers started with --enable-deterministic-inference. Unseeded requests ask for n
samples at once (one shared prefill).

Failures: every HTTP call has a timeout; connection errors, timeouts and HTTP 5xx are retried with
exponential backoff and jitter, then EngineError names the server URL, the route and the last
failure. A request the server rejects because prompt + max_new_tokens reaches its context length
becomes completions with finish reason "abort" (the embedded engine aborts prompts longer than
its context; keep max_prompt_length + max_response_length below the server's context length).
An interrupted or failed generate aborts its outstanding requests on the servers.

SPMD: construct on every rank (rank 0 launches the servers and shares their URLs); call
`generate` on every rank of a model-parallel group (its first rank sends, see dp_flow);
`update_weights` is a collective over all ranks; pause/resume/abort talk to the servers from
rank 0 only.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from typing import Any, Optional, Sequence

from masa_megatron.rollout.base import (FINISH_ABORT, FINISH_REASONS, Completion,
                                        GenerationRequest, GenerationResult, RolloutEngine)
from masa_megatron.rollout.sglang_launch import (ATTACHED_REFUSED_LIMIT, EngineError, HTTPClient,
                                                 ManagedProcess, ServerOptions, launch_router,
                                                 launch_servers, wait_healthy)

__all__ = ["EngineError", "HTTPClient", "SGLangEngine", "generate_payloads", "parse_completions"]

log = logging.getLogger(__name__)
_CONTEXT_HINTS = ("context length", "longer than", "too long")
_INT64 = 1 << 64


# ---------------------------------------------------------------- request <-> JSON

def _signed64(seed: int) -> int:
    seed %= _INT64
    return seed - _INT64 if seed >= 1 << 63 else seed


def generate_payloads(request: GenerationRequest, rid: str) -> list[dict]:
    """The /generate bodies of one request: one for n samples, or n one-sample seeded ones."""
    from masa_megatron.rollout.embedded import mix_seed

    p = request.sampling
    params = {"max_new_tokens": p.max_new_tokens, "temperature": p.temperature, "top_p": p.top_p,
              "top_k": p.top_k if p.top_k > 0 else -1, "ignore_eos": p.ignore_eos, "n": p.n}
    if p.stop_token_ids:
        params["stop_token_ids"] = list(p.stop_token_ids)
    base = {"input_ids": [int(t) for t in request.prompt_token_ids], "return_logprob": True}
    if p.seed is None or p.greedy:
        return [dict(base, sampling_params=params, rid=rid)]
    return [dict(base, rid=f"{rid}-s{j}",
                 sampling_params=dict(params, n=1, sampling_seed=_signed64(mix_seed(p.seed, j))))
            for j in range(p.n)]


def parse_completions(body: Any, where: str) -> tuple[list[Completion], Optional[int]]:
    """Completions (and the weight version, when numeric) from a /generate answer."""
    items = body if isinstance(body, list) else [body]
    completions, version = [], None
    for item in items:
        try:
            ids = [int(t) for t in item["output_ids"]]
            meta = item["meta_info"]
            entries = meta.get("output_token_logprobs") or []
            logprobs = [float(e[0]) for e in entries]
            if [int(e[1]) for e in entries] != ids:
                raise ValueError("output_token_logprobs token ids differ from output_ids")
            reason = (meta.get("finish_reason") or {}).get("type") or FINISH_ABORT
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise EngineError(f"{where}: malformed /generate answer ({err}): "
                              f"{str(item)[:300]}") from None
        completions.append(Completion(ids, logprobs,
                                      reason if reason in FINISH_REASONS else FINISH_ABORT))
        try:
            version = int(meta.get("weight_version"))
        except (TypeError, ValueError):
            pass
    return completions, version


# ---------------------------------------------------------------- the engine

def _dist_rank() -> tuple[int, int]:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _node_layout() -> tuple[int, int]:
    """(nodes, local rank) of this torchrun launch; (1, 0) outside torchrun."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return max(1, world // max(1, local_world)), int(os.environ.get("LOCAL_RANK", "0"))


def _advertised(url: str) -> str:
    """`url` (a local listener) as other nodes reach it: by this node's hostname."""
    from urllib.parse import urlparse

    return f"http://{socket.gethostname()}:{urlparse(url).port}"


class SGLangEngine(RolloutEngine):
    """Rollouts from SGLang servers it launches (`model_path`, `num_servers` x `tp` GPUs) or
    attaches to (`urls`). See the module docstring for the protocol and the SPMD contract."""

    def __init__(self, model_path: Optional[str] = None, *, urls: Sequence[str] = (),
                 num_servers: int = 1, tp: int = 1, mem_fraction: float = 0.7,
                 host: str = "127.0.0.1", base_port: int = 30000, router: bool = False,
                 router_port: Optional[int] = None, router_url: Optional[str] = None,
                 concurrency: int = 256,
                 health_timeout_s: float = 600.0, request_timeout_s: float = 600.0,
                 max_retries: int = 3, retry_backoff_s: float = 0.5, colocate: bool = False,
                 weight_sync: str = "disk", bucket_mb: int = 512, sync_dir: Optional[str] = None,
                 verify_sync: bool = False, seed: int = 0, deterministic: bool = False,
                 server_module: Optional[str] = None, router_module: Optional[str] = None,
                 launch_env: Optional[dict] = None, log_dir: Optional[str] = None,
                 python: str = "",
                 extra_server_args: Sequence[str] = (), sync_options: Optional[dict] = None):
        if not urls and not model_path:
            raise EngineError("SGLang engine: give rollout.sglang_urls to attach to, or a model "
                              "path to launch servers from")
        if router and urls and not router_url:
            raise EngineError("rollout.sglang_router with rollout.sglang_urls (servers started "
                              "elsewhere): give the router they sit behind, "
                              "rollout.sglang_router_url (slurm/disaggregated.sbatch passes it); "
                              "the trainer starts a router only for servers it launches itself")
        self.model_path, self.colocate, self.concurrency = model_path, colocate, concurrency
        self.tp, self.weight_version = tp, 0
        self.rank, self.world = _dist_rank()
        self.processes: list[ManagedProcess] = []
        self.http = HTTPClient(timeout_s=request_timeout_s, max_retries=max_retries,
                               backoff_s=retry_backoff_s, connections=concurrency)
        self._released: list[str] = []
        self.metrics: dict[str, float] = {}          # last sync stats and memory per phase
        self.last_sync_stats: dict[str, float] = {}
        self._inflight: set[tuple[str, str]] = set()
        self._next_server = 0
        self._alive = True
        urls = [u.rstrip("/") for u in urls]
        router_url = router_url.rstrip("/") if router_url else None
        attached = bool(urls)
        if not attached:
            opts = ServerOptions(model_path=model_path, tp=tp, mem_fraction=mem_fraction,
                                 host=host, port=base_port, memory_saver=colocate, seed=seed,
                                 deterministic=deterministic, extra_args=extra_server_args,
                                 env=dict(launch_env or {}))
            if server_module:
                opts.module = server_module
            if python:
                opts.python = python
            urls = self._launch_by_node(opts, num_servers, log_dir, health_timeout_s)
        if self.rank == 0:
            try:
                for url in urls if attached else ():   # not ours: a refusal will not go away
                    wait_healthy(url, health_timeout_s, refused_limit=ATTACHED_REFUSED_LIMIT)
                if attached:
                    self._clear_previous_attempt(urls)
                if router_url:
                    wait_healthy(router_url, health_timeout_s,
                                 refused_limit=ATTACHED_REFUSED_LIMIT)
                elif router:
                    router_url = self._launch_router(urls, host, router_port or base_port + 100,
                                                     router_module, python, launch_env, log_dir,
                                                     health_timeout_s)
            except BaseException as err:
                self._share((None, None, f"{err}"))
                self.shutdown()
                raise
        urls, router_url, error = self._share((urls, router_url, None))
        if error is not None:
            self.shutdown()
            raise EngineError(f"SGLang router or servers failed on rank 0: {error}")
        self.server_urls, self.router_url, self.attached = list(urls), router_url, attached
        from masa_megatron.rollout.weight_sync import SyncTarget, build_weight_sync

        target = SyncTarget(urls=self.server_urls, tp_sizes=[tp] * len(self.server_urls),
                            http=self.http)
        self.weight_sync = build_weight_sync(
            weight_sync, target, bucket_bytes=bucket_mb << 20, verify=verify_sync,
            sync_dir=sync_dir, source_dir=model_path, **(sync_options or {}))

    def _clear_previous_attempt(self, urls: list[str]) -> None:
        """Servers we attach to may have outlived a killed trainer attempt: abort the requests
        it left running and close a weight-update session it left open (a server with none
        answers 400, an older one without sessions 404: both are fine). The caller resyncs the
        weights before generating (train/main.py)."""
        for reply in self.http.call_all(urls, "/abort_request", {"rid": "", "abort_all": True},
                                        retries=1, timeout_s=30.0):
            reply.check()
        for reply in self.http.call_all(urls, "/end_weight_update", {}, retries=1,
                                        timeout_s=30.0):
            if reply.status == 200:
                log.warning("SGLang server %s: closed a weight-update session left open by a "
                            "previous trainer attempt", reply.url)

    def _launch_by_node(self, opts: ServerOptions, num_servers: int, log_dir: Optional[str],
                        health_timeout_s: float) -> list[str]:
        """Start the servers where their GPUs are (collective); every server's URL, in rank
        order. One node: rank 0 starts them all on 127.0.0.1 (or `host`). Several nodes: each
        node's local rank 0 starts num_servers / nodes servers on that node's GPUs, listening
        on every interface, named by the node's hostname (resolved by each client, as Slurm's
        node names are); server s then sits beside global ranks s*tp .. s*tp+tp-1."""
        nodes, local_rank = _node_layout()
        if nodes > 1:
            if num_servers % nodes:
                raise EngineError(f"rollout.sglang_num_servers={num_servers}: colocated servers "
                                  f"are started per node and {nodes} nodes cannot hold an "
                                  f"equal share")
            num_servers //= nodes
            opts.host = "0.0.0.0"
        starts_here = local_rank == 0 if nodes > 1 else self.rank == 0
        mine, error = [], None
        if starts_here:
            try:
                self.processes = launch_servers(opts, num_servers, log_dir=log_dir,
                                                health_timeout_s=health_timeout_s)
                mine = [_advertised(p.url) if nodes > 1 else p.url for p in self.processes]
            except Exception as err:   # raised on every rank below
                error = f"{socket.gethostname()}: {err}"
        everyone = [(mine, error)]
        if self.world > 1:
            import torch

            everyone = [None] * self.world
            torch.distributed.all_gather_object(everyone, (mine, error))
        errors = [e for _, e in everyone if e]
        if errors:
            self.shutdown()
            raise EngineError("SGLang servers failed to start: " + "; ".join(errors))
        return [url for urls, _ in everyone for url in urls]

    def _launch_router(self, urls, host, port, module, python, env, log_dir,
                       health_timeout_s) -> str:
        """An sglang-router in front of the servers this engine launched (rank 0); its URL."""
        spans_nodes = _node_layout()[0] > 1
        extra = {"module": module} if module else {}
        if python:
            extra["python"] = python
        proc = launch_router(urls, host="0.0.0.0" if spans_nodes else host, log_dir=log_dir,
                             env=env, port=port, health_timeout_s=health_timeout_s, **extra)
        self.processes.append(proc)
        return _advertised(proc.url) if spans_nodes else proc.url

    @classmethod
    def from_config(cls, model: Any, cfg: Any, *, model_path: Optional[str] = None,
                    output_dir: Optional[str] = None, vocab_size: Optional[int] = None,
                    eos_token_ids: Sequence[int] = (), **overrides: Any) -> "SGLangEngine":
        """Same call as EmbeddedEngine.from_config(model, rollout_cfg, ...). `cfg` is a
        RolloutConfig (then give `model_path`) or an ExperimentConfig (model.hf_path and
        trainer.output_dir are taken from it). `model`, `vocab_size` and `eos_token_ids` are
        accepted for symmetry and unused: the servers read them from the checkpoint."""
        if hasattr(cfg, "rollout"):
            model_path = model_path or cfg.model.hf_path
            output_dir = output_dir or cfg.trainer.output_dir
            cfg = cfg.rollout
        if not (model_path or cfg.sglang_urls):
            raise EngineError("SGLangEngine.from_config: no model path to launch servers from "
                              "and no rollout.sglang_urls to attach to")
        kwargs = dict(
            model_path=model_path, urls=list(cfg.sglang_urls), num_servers=cfg.sglang_num_servers,
            tp=cfg.sglang_tp, mem_fraction=cfg.sglang_mem_fraction, host=cfg.sglang_host,
            base_port=cfg.sglang_base_port, router=cfg.sglang_router,
            router_url=getattr(cfg, "sglang_router_url", "") or None,
            concurrency=cfg.sglang_concurrency, health_timeout_s=cfg.sglang_health_timeout_s,
            python=cfg.sglang_python,
            server_module=getattr(cfg, "sglang_server_module", None),
            colocate=cfg.colocate, weight_sync=cfg.weight_sync,
            bucket_mb=cfg.weight_sync_bucket_mb, seed=cfg.seed,
            deterministic=cfg.sglang_deterministic, extra_server_args=list(cfg.sglang_extra_args),
            sync_dir=f"{output_dir}/weight_sync" if output_dir else None,
            # on the run's (shared) storage, one folder per node
            log_dir=f"{output_dir}/sglang_logs/{socket.gethostname()}" if output_dir else None)
        for name in ("request_timeout_s", "max_retries", "retry_backoff_s"):
            if hasattr(cfg, f"sglang_{name}"):
                kwargs[name] = getattr(cfg, f"sglang_{name}")
        if hasattr(cfg, "weight_sync_verify"):
            kwargs["verify_sync"] = cfg.weight_sync_verify
        if cfg.weight_sync == "broadcast":
            address = getattr(cfg, "weight_sync_master_address", "") or None
            kwargs["sync_options"] = {"master_address": address}
            if cfg.weight_sync_flattened_broadcast:
                kwargs["sync_options"]["load_format"] = "flattened_bucket"
        kwargs.update(overrides)
        return cls(**kwargs)

    def _share(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (world group); identity without torch.distributed."""
        if self.world == 1:
            return obj
        import torch

        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    # ------------------------------------------------------------ generation
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Call on every rank of a model-parallel group; its first rank's requests are served
        and every rank of the group returns the same results."""
        from masa_megatron.rollout.dp_flow import generate_in_model_parallel_group

        if not self._alive:
            raise EngineError("SGLang engine was shut down")
        return generate_in_model_parallel_group(self.generate_local, requests)

    def generate_local(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Send `requests` from this process (no collectives)."""
        return self.http.run(self._generate(list(requests)))

    def _pick_url(self) -> str:
        if self.router_url:
            return self.router_url
        url = self.server_urls[self._next_server % len(self.server_urls)]
        self._next_server += 1
        return url

    async def _generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        gate = asyncio.Semaphore(self.concurrency)
        batch = uuid.uuid4().hex[:10]
        jobs = []
        for i, req in enumerate(requests):
            url = self._pick_url()
            rid = f"{req.request_id}-{batch}" if req.request_id else f"masa-{batch}-{i}"
            jobs.append([asyncio.ensure_future(self._post_generate(gate, url, body))
                         for body in generate_payloads(req, rid)])
        flat = [task for tasks in jobs for task in tasks]
        try:
            await asyncio.gather(*flat)
        except BaseException:
            for task in flat:
                task.cancel()
            await self._abort_inflight()
            raise
        results = []
        for req, tasks in zip(requests, jobs):
            completions, version = [], None
            for task in tasks:
                got, got_version = task.result()
                completions += got
                version = got_version if got_version is not None else version
            if len(completions) != req.sampling.n:
                raise EngineError(f"SGLang returned {len(completions)} samples for a request "
                                  f"with n={req.sampling.n}")
            results.append(GenerationResult(req.request_id, len(req.prompt_token_ids), completions,
                                            self.weight_version if version is None else version))
        return results

    async def _post_generate(self, gate: asyncio.Semaphore, url: str, body: dict):
        key = (url, body["rid"])
        async with gate:
            self._inflight.add(key)
            try:
                reply = await self.http.request(url, "/generate", body)
            finally:
                self._inflight.discard(key)
        if reply.status == 400 and any(h in reply.message().lower() for h in _CONTEXT_HINTS):
            log.warning("SGLang server %s rejected a prompt of %d tokens: %s", url,
                        len(body["input_ids"]), reply.message())
            n = body["sampling_params"]["n"]
            return [Completion([], [], FINISH_ABORT) for _ in range(n)], None
        reply.check()
        return parse_completions(reply.body, f"SGLang server {url}")

    async def _abort_inflight(self) -> None:
        pending = list(self._inflight)
        if pending:
            await asyncio.gather(*(self.http.request(url, "/abort_request", {"rid": rid},
                                                     timeout_s=5.0, retries=0)
                                   for url, rid in pending), return_exceptions=True)

    def abort(self, request_id: Optional[str] = None) -> None:
        """Abort one SGLang request id (`rid` as sent) or, with None, everything running."""
        if self.rank != 0:
            return
        body = {"rid": request_id or "", "abort_all": request_id is None}
        for reply in self.http.call_all(self.server_urls, "/abort_request", body, retries=1,
                                        timeout_s=30.0):
            reply.check()

    # ------------------------------------------------------------ weights and memory
    def update_weights(self, model: Any = None, path: Optional[str] = None, *,
                       version: Optional[int] = None) -> int:
        """Collective: every rank calls it. With `model`, the configured weight sync moves the
        trainer's weights; with only `path`, the servers load that HF folder from disk."""
        version = self.weight_version + 1 if version is None else int(version)
        if "weights" in self._released:
            self._memory("/resume_memory_occupation", ["weights"])
        if model is not None:
            self.last_sync_stats = self.weight_sync.sync(model, version)
        elif path is not None:
            self.last_sync_stats = self.weight_sync.load_folder(str(path), version)
        else:
            raise ValueError("update_weights needs a model or a path")
        self.metrics.update(self.last_sync_stats)
        self.weight_version = version
        return version

    def _memory(self, path: str, tags: list[str]) -> None:
        if self.rank == 0:
            for reply in self.http.call_all(self.server_urls, path, {"tags": tags}, retries=1):
                reply.check()
        if path.startswith("/release"):
            self._released += [t for t in tags if t not in self._released]
        else:
            self._released = [t for t in self._released if t not in tags]

    def pause(self) -> None:
        """Colocated servers release their weights and KV cache (needs --enable-memory-saver,
        which `colocate` adds); otherwise nothing to do. Memory metrics land in `metrics`."""
        from masa_megatron.rollout.colocate import memory_metrics

        if self.colocate and not self._released:
            self._memory("/release_memory_occupation", ["kv_cache", "weights"])
        self.metrics.update(memory_metrics("rollout_paused"))

    def resume(self) -> None:
        from masa_megatron.rollout.colocate import memory_metrics

        if self._released:
            self._memory("/resume_memory_occupation", list(self._released))
        self.metrics.update(memory_metrics("rollout_resumed"))

    def flush_cache(self) -> None:
        if self.rank == 0:
            for reply in self.http.call_all(self.server_urls, "/flush_cache", retries=1):
                reply.check()

    def health(self) -> bool:
        if not self._alive:
            return False
        urls = self.server_urls + ([self.router_url] if self.router_url else [])
        try:
            replies = self.http.call_all(urls, "/health", method="GET", timeout_s=10.0,
                                         retries=0)
        except EngineError:
            return False
        return all(r.status == 200 for r in replies)

    def shutdown(self) -> None:
        """Stop what this engine started (router first, then servers) and its HTTP client."""
        self._alive = False
        sync = getattr(self, "weight_sync", None)
        if sync is not None:
            try:
                sync.close()
            except Exception as err:  # shutting down: report, keep going
                log.warning("weight sync close failed: %s", err)
        for proc in reversed(self.processes):
            proc.stop()
        self.processes = []
        self.http.close()

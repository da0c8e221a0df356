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
SGLang seeds by (sampling_seed, position) and its n > 1 copies of a request all carry the same
sampling_params, so n copies under one seed would be identical. It is honoured by servers started
with --enable-deterministic-inference. Unseeded requests ask for n samples at once (one shared
prefill); seeded copies still share the prompt's prefill through SGLang's radix cache.

Concurrency (sglang_scheduler.py): each server runs at most its limit of our sequences, the
configured max_running_requests or what its /get_server_info reports, split between the senders;
requests wait in the client and go to the least-loaded server. Through a router, the router
places requests and `concurrency` bounds what this sender has in flight.

Failures: every HTTP call has a timeout; connection errors, timeouts and HTTP 5xx are retried with
exponential backoff and jitter, then EngineError names the server URL, the route and the last
failure. A request the server rejects because prompt + max_new_tokens reaches its context length
becomes completions with finish reason "abort" (the embedded engine aborts prompts longer than
its context; keep max_prompt_length + max_response_length below the server's context length).
An interrupted or failed generate aborts its outstanding requests on the servers.

SPMD: construct on every rank (servers are launched where their GPUs are and their URLs shared,
or attached to: sglang_placement.py); call
`generate` on every rank of a model-parallel group (its first rank sends, see dp_flow);
`update_weights` is a collective over all ranks; release/resume/abort talk to the servers from
rank 0 only.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, Optional, Sequence

from masa_megatron.rollout.base import (FollowUp, GenerationRequest, GenerationResult,
                                        RolloutEngine)
from masa_megatron.rollout.sglang_protocol import (_signed64, generate_payloads,  # noqa: F401
                                                   parse_completions)
from masa_megatron.rollout.sglang_scheduler import (RequestRunner, ServerSlots,
                                                    data_parallel_senders, server_capacity)
from masa_megatron.rollout.sglang_launch import (ATTACHED_REFUSED_LIMIT, EngineError, HTTPClient,
                                                 ManagedProcess, ServerOptions, wait_healthy)
from masa_megatron.rollout.sglang_placement import (clear_previous_attempt, launch_by_node,
                                                    launch_router_for)

__all__ = ["EngineError", "HTTPClient", "SGLangEngine", "generate_payloads", "parse_completions"]

log = logging.getLogger(__name__)
MEMORY_TAGS = ("kv_cache", "cuda_graph", "weights")   # SGLang's GPU memory types


# ---------------------------------------------------------------- the engine

def _dist_rank() -> tuple[int, int]:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class SGLangEngine(RolloutEngine):
    """Rollouts from SGLang servers it launches (`model_path`, `num_servers` x `tp` GPUs) or
    attaches to (`urls`). See the module docstring for the protocol and the SPMD contract."""

    def __init__(self, model_path: Optional[str] = None, *, urls: Sequence[str] = (),
                 num_servers: int = 1, tp: int = 1, mem_fraction: float = 0.7,
                 host: str = "127.0.0.1", base_port: int = 30000, router: bool = False,
                 router_port: Optional[int] = None, router_url: Optional[str] = None,
                 concurrency: int = 256, max_running_requests: int = 0,
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
        self.max_running_requests = max_running_requests   # per server; 0: ask each server
        self.senders: Optional[int] = None    # clients sharing the servers; None: DP size
        self._slots: Optional[ServerSlots] = None           # built at the first generation
        self.tp, self.weight_version = tp, 0
        self.rank, self.world = _dist_rank()
        self.processes: list[ManagedProcess] = []
        self.http = HTTPClient(timeout_s=request_timeout_s, max_retries=max_retries,
                               backoff_s=retry_backoff_s, connections=concurrency)
        self._released: list[str] = []
        self.metrics: dict[str, float] = {}          # last sync stats
        self.last_sync_stats: dict[str, float] = {}
        self._inflight: set[tuple[str, str]] = set()
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
            self.processes, urls = launch_by_node(opts, num_servers, rank=self.rank,
                                                  world=self.world, log_dir=log_dir,
                                                  health_timeout_s=health_timeout_s)
        if self.rank == 0:
            try:
                for url in urls if attached else ():   # not ours: a refusal will not go away
                    wait_healthy(url, health_timeout_s, refused_limit=ATTACHED_REFUSED_LIMIT)
                if attached:
                    clear_previous_attempt(self.http, urls)
                if router_url:
                    wait_healthy(router_url, health_timeout_s,
                                 refused_limit=ATTACHED_REFUSED_LIMIT)
                elif router:
                    proc, router_url = launch_router_for(
                        urls, host=host, port=router_port or base_port + 100,
                        module=router_module, python=python, env=launch_env, log_dir=log_dir,
                        health_timeout_s=health_timeout_s)
                    self.processes.append(proc)
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
            concurrency=cfg.sglang_concurrency,
            max_running_requests=cfg.sglang_max_running_requests,
            health_timeout_s=cfg.sglang_health_timeout_s,
            python=cfg.sglang_python,
            server_module=getattr(cfg, "sglang_server_module", None),
            router_module=getattr(cfg, "sglang_router_module", None),
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
        return self.http.run(self._run(list(requests)))

    def generate_chained(self, requests: list[GenerationRequest], follow: FollowUp,
                         stream: bool = True) -> list[GenerationResult]:
        """See RolloutEngine.generate_chained. Streaming: request i's follow-ups go out as soon
        as request i is answered; stream=False runs the two phases (all first requests, then
        all follow-ups) through the same client, for comparison. Collective like `generate`."""
        from masa_megatron.rollout.dp_flow import generate_in_model_parallel_group

        if not self._alive:
            raise EngineError("SGLang engine was shut down")
        return generate_in_model_parallel_group(
            lambda reqs: self.http.run(self._run(list(reqs), follow, stream)), requests)

    async def _run(self, requests, follow=None, stream=True) -> list[GenerationResult]:
        runner = RequestRunner(self, await self._server_slots())
        try:
            return await runner.run(requests, follow, stream)
        finally:
            self.rollout_metrics = runner.metrics()

    async def _server_slots(self) -> ServerSlots:
        """This sender's slots on every server (built once; see sglang_scheduler)."""
        slots = self._slots
        if slots is None:
            if self.router_url:      # the router places requests: one pool of `concurrency`
                slots = ServerSlots([self.router_url], [self.concurrency])
            else:
                configured = self.max_running_requests
                limits = [configured] * len(self.server_urls) if configured > 0 else \
                    [server_capacity((await self.http.request(url, "/get_server_info",
                                                              method="GET")).check().body, url)
                     for url in self.server_urls]
                senders = self.senders or data_parallel_senders()
                slots = ServerSlots.split(self.server_urls, limits, senders)
            self._slots = slots
        return slots

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

    def release(self, tags: Sequence[str] = MEMORY_TAGS) -> None:
        """The servers free the GPU memory of `tags` (SGLang's kv_cache, cuda_graph, weights;
        needs --enable-memory-saver, which `colocate` adds). Call on every rank (rank 0 talks).
        SGLang asserts it is idle: call once every rank's generation has returned (the
        hand-off's barrier); requests of this process still in flight are refused here."""
        if self._inflight:
            raise EngineError(f"release_memory_occupation with {len(self._inflight)} requests "
                              f"of this process in flight (e.g. {sorted(self._inflight)[0]}): "
                              f"the server must be idle")
        tags = [t for t in tags if t not in self._released]
        if tags:
            self._memory("/release_memory_occupation", tags)

    def resume(self, tags: Optional[Sequence[str]] = None) -> None:
        """The servers take back the memory of `tags` (default: everything released)."""
        tags = [t for t in (self._released if tags is None else tags) if t in self._released]
        if tags:
            self._memory("/resume_memory_occupation", tags)

    def pause(self) -> None:
        """Colocated servers release all their GPU memory; otherwise nothing to do."""
        if self.colocate:
            self.release(MEMORY_TAGS)

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

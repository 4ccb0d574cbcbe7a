"""Data parallelism on Ray: N engine replicas as Ray actors, each on its own GPUs (or share of the CPUs).

    DataParallelLLM(model, data_parallel_size=N, **options).generate(prompts, sampling_params)

The driver validates and tokenizes the requests, spreads them over the replicas by token count, and returns the
outputs in input order. A replica that dies mid-call is replaced (or its requests go to the others) and its
unfinished requests run again. Ray is imported only when a DataParallelLLM is built.
"""
import dataclasses
import heapq
import itertools
import os
import random
import threading
import time
import warnings
import weakref
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Integral
from types import ModuleType
from typing import Any

import torch
from tqdm.auto import tqdm

from nanovllm.config import Config
from nanovllm.engine.exclusive import OneCallAtATime
from nanovllm.engine.requests import Request, RequestBuilder, load_tokenizer
from nanovllm.sampling_params import SamplingParams

RAY_INSTALL_HINT = 'pip install -e ".[ray]"'
DEVICES = ("auto", "cpu", "cuda")
PLACEMENT_TIMEOUT_S = 120.0  # for the cluster to find room for a replica (a busy cluster, a lost node)
START_TIMEOUT_S = 900.0  # for a replica to load its model (cold compile caches, large checkpoints)
POLL_INTERVAL_S = 0.5
MAX_RESTARTS = 3  # per replica and generate call: a request that kills every replica must not loop forever
EXIT_TIMEOUT_S = 30.0  # for a replica's engine to stop its step and free its GPUs and workers before it is killed
KILL_TIMEOUT_S = 10.0  # for a killed replica's process to be gone
SHUT_DOWN = "this LLM has been shut down with exit(); create a new one"


def import_ray() -> ModuleType:
    try:
        import ray
    except ImportError as e:
        raise ImportError(f"data_parallel_size > 1 and nanovllm.ray_data need Ray: {RAY_INSTALL_HINT}") from e
    return ray


def check_data_parallel_size(value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"data_parallel_size must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"data_parallel_size must be >= 1, got {value}")
    return int(value)


def driver_config(model: str, options: dict) -> Config:
    """The engine's Config, built on the driver to reject bad options before any actor starts. The driver may not
    have the replicas' GPUs, so it checks the options as for the CPU; each replica resolves the device itself."""
    device = options.get("device", "auto")
    if str(device) not in DEVICES:
        raise ValueError(f"device must be one of {list(DEVICES)}, got {device!r}")
    return Config.from_options(model, **{**options, "device": "cpu"})


def wants_gpu(device, cluster_gpus: float) -> bool:
    return str(device) == "cuda" or (str(device) == "auto" and cluster_gpus > 0)


def spread_by_cost(costs: list[int], loads: list[int]) -> list[list[int]]:
    """Longest first into the least loaded replica (ties: the lower replica). Returns each replica's request
    indices in input order. `loads` is the work each replica already has."""
    heap = [(load, slot) for slot, load in enumerate(loads)]
    heapq.heapify(heap)
    shares = [[] for _ in loads]
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        load, slot = heapq.heappop(heap)
        shares[slot].append(i)
        heapq.heappush(heap, (load + costs[i], slot))
    return [sorted(share) for share in shares]


@dataclass(slots=True)
class ReplicaInfo:
    """What a started replica reports about itself."""
    slot: int
    node_id: str
    pid: int
    device: str
    gpu_ids: list  # Ray's ids of the node's GPUs the replica holds; the engine sees them as cuda:0..
    cuda_visible_devices: str | None
    num_kvcache_blocks: int


class EngineReplica:
    """One engine (an LLM) inside a Ray actor (DataParallelLLM makes it remote, so this module imports without Ray)."""

    def __init__(self, slot: int, model: str, options: dict, num_threads: int | None):
        if num_threads is not None:  # the replica's share of the node's cores, not all of them
            torch.set_num_threads(num_threads)
        from nanovllm.llm import LLM  # here: llm.py imports this module
        self.slot = slot
        self.engine = LLM(model, **options)
        self.exiting = False

    def info(self) -> ReplicaInfo:
        import ray
        ctx = ray.get_runtime_context()
        return ReplicaInfo(self.slot, ctx.get_node_id(), os.getpid(), self.engine.config.device.type,
                           list(ray.get_gpu_ids()), os.environ.get("CUDA_VISIBLE_DEVICES"),
                           self.engine.config.num_kvcache_blocks)

    def generate(self, prompts: list[list[int]], sampling_params: list[SamplingParams]) -> list[dict] | None:
        """The engine's generate. Ray cannot interrupt a running actor method, ray.cancel only flags it: the call
        stops at the next step and drops its requests (None), so the driver's Ctrl-C frees the replica."""
        import ray
        engine = self.engine
        with self._ended_by_exit():
            return engine._generate(engine._requests(prompts, sampling_params), False,
                                    ray.get_runtime_context().is_canceled)

    def stream(self, prompts: list[list[int]], sampling_params: list[SamplingParams]) -> Iterator[list[dict]]:
        """The engine's stream events, a step's worth at a time (fewer, larger Ray objects)."""
        batch = []
        with self._ended_by_exit():
            for event in self.engine.stream(prompts, sampling_params):
                batch.append(event)
                if event["finished"] or len(batch) >= 64:
                    yield batch
                    batch = []
            if batch:
                yield batch

    def exit(self):
        """Runs beside a running generate or stream (its own concurrency group, see `_spawn`): as on one engine,
        that call stops at its next step."""
        self.exiting = True
        self.engine.exit()

    @contextmanager
    def _ended_by_exit(self):
        """A call that exit() stopped ends quietly, as a cancelled one: the driver, which called exit(), reads it
        no more, and Ray would log its RuntimeError as an unhandled error."""
        try:
            yield
        except RuntimeError:
            if not self.exiting:
                raise


def _unsent(event: dict, share: list[int], seen: dict, sent: dict) -> dict | None:
    """A replica's event with the call's index, less what an earlier run of the same request already sent (a
    request runs again, with the same outputs, after its replica died); None when nothing is new."""
    index = share[event["index"]]
    key = (index, event["completion"])
    tokens, chars = seen.get(key, (0, 0))
    seen[key] = (tokens + len(event["token_ids"]), chars + len(event["text"]))
    done = sent.setdefault(key, [0, 0, False])
    if done[2]:
        return None
    new_ids = event["token_ids"][max(done[0] - tokens, 0):]
    new_text = event["text"][max(done[1] - chars, 0):]
    done[0] = max(done[0], tokens + len(event["token_ids"]))
    done[1] = max(done[1], chars + len(event["text"]))
    done[2] = event["finished"]
    if not new_ids and not new_text and not event["finished"]:
        return None
    return {**event, "index": index, "token_ids": new_ids, "text": new_text}


def cost(request: Request) -> int:
    """The tokens a request will hold at most: what spreading balances."""
    return len(request.token_ids) + request.sampling_params.n * request.sampling_params.max_tokens


@dataclass(slots=True)
class _Replica:
    slot: int
    placement_group: Any
    actor: Any = None
    started: Any = None  # ObjectRef of actor.info(): resolves once the engine is up
    spawned_at: float = 0.0
    info: ReplicaInfo | None = None
    restarts: int = 0  # in the current generate call
    last_error: str = ""


@dataclass(slots=True)
class _Job:
    """Requests submitted to one actor in one call of its method `method` (an EngineReplica method)."""
    replica: _Replica
    actor: Any
    method: str
    indices: list[int]
    cost: int


def connect_ray(ray):
    """Join the cluster that RAY_ADDRESS names, or start a local one (not whichever cluster last ran here)."""
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto")
    else:  # Ray finds the GPUs itself; torch's count makes sure they are the ones torch can use
        ray.init(address="local", num_gpus=torch.cuda.device_count() if torch.cuda.is_available() else None)


class _RaySession:
    """Connects this process to Ray for all DataParallelLLMs: joins the cluster that RAY_ADDRESS names, or starts
    a local one; the last user to leave disconnects (which stops a local cluster) only if it connected."""

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._connected_here = False

    def acquire(self, ray):
        with self._lock:
            if not ray.is_initialized():
                connect_ray(ray)
                self._connected_here = True
            self._users += 1

    def release(self, ray):
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._connected_here:
                self._connected_here = False
                ray.shutdown()


RAY_SESSION = _RaySession()


def _retire(replica: "_Replica", reason: str):
    """Forget a replica's (killed or dead) actor and free its placement group."""
    from ray.util import remove_placement_group
    replica.actor = replica.started = None
    replica.last_error = reason
    remove_placement_group(replica.placement_group)


def _kill(ray, actors: list):
    """Kill the actors and return once they are gone. ray.kill only sends the word: a method called before it reaches
    an actor's process would still run there, so each actor is asked until the call fails as its death."""
    for actor in actors:
        ray.kill(actor)
    deadline = time.monotonic() + KILL_TIMEOUT_S
    for actor in actors:
        while (left := deadline - time.monotonic()) > 0:
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=left)
            except ray.exceptions.RayActorError:
                break
            except ray.exceptions.GetTimeoutError:
                pass
            time.sleep(0.01)
        else:
            warnings.warn(f"a killed data-parallel replica's actor was still alive after {KILL_TIMEOUT_S:.0f}s",
                          RuntimeWarning, stacklevel=3)
            return


def _release(ray, replicas: list["_Replica"]):
    """A DataParallelLLM's finaliser (exit(), or the engine collected): end the live replicas' engines and actors,
    free their placement groups, leave Ray. Ray shut down under it by the user leaves nothing to free."""
    try:
        if ray.is_initialized():
            live = [r for r in replicas if r.actor is not None]
            # a replacement still building its engine runs no method before that ends: it is killed at once
            up = [r for r in live if ray.wait([r.started], timeout=0)[0]]
            # not queued behind a running call: each engine stops it at its next step, then frees its GPUs
            exits = [r.actor.exit.options(concurrency_group="exit").remote() for r in up]
            ray.wait(exits, num_returns=len(exits), timeout=EXIT_TIMEOUT_S)
            _kill(ray, [r.actor for r in live])
            for r in live:
                _retire(r, "shut down with exit()")
    finally:
        RAY_SESSION.release(ray)


class DataParallelLLM:
    """`data_parallel_size` engine replicas on a Ray cluster; `generate` works as on one engine."""

    def __init__(self, model: str, data_parallel_size: int, **options):
        self._closed = True  # until the replicas are up: exit() then has nothing to do
        self.data_parallel_size = check_data_parallel_size(data_parallel_size)
        self._config = driver_config(model, options)  # bad options fail here, before Ray is even imported
        self.tokenizer = load_tokenizer(self._config)
        # seeds for requests without one, drawn on the driver as one engine would: a request then samples the same
        # tokens whichever replica runs it, also when it runs again after a replica died
        self._rng = random.Random(self._config.seed)
        self._request_counter = itertools.count()  # outputs' request_id, numbered here as one engine numbers them
        self._one_call = OneCallAtATime()
        # exit() (any thread) against a replacement spawned by a running call: no actor is made once exit() began
        self._spawning = threading.Lock()
        # workers on other nodes, or in another working directory, need the path as the driver sees it
        self._model = os.path.abspath(os.fspath(model))
        if options.get("tokenizer") is not None:
            options = {**options, "tokenizer": os.path.abspath(self._config.tokenizer)}
        self._options = options
        self._ray = ray = import_ray()
        RAY_SESSION.acquire(ray)
        try:
            self._replicas = self._start_replicas()
        except BaseException:
            RAY_SESSION.release(ray)
            raise
        # released at exit() or when the engine is collected; holds the replicas, not the engine
        self._finalizer = weakref.finalize(self, _release, ray, self._replicas)
        self._closed = False

    # ---- replicas ----------------------------------------------------------------------------------------

    def _resources(self) -> tuple[dict, int | None]:
        """One replica's placement-group bundle and its torch thread count (None on GPU)."""
        ray, n, tp = self._ray, self.data_parallel_size, self._config.tensor_parallel_size
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        total = {key: sum(node.get(key, 0) for node in nodes) for key in ("CPU", "GPU")}
        per_node = {key: max((node.get(key, 0) for node in nodes), default=0) for key in ("CPU", "GPU")}
        if wants_gpu(self._options.get("device", "auto"), total["GPU"]):
            if n * tp > total["GPU"] or tp > per_node["GPU"]:
                raise RuntimeError(f"data_parallel_size={n} x tensor_parallel_size={tp} needs {n * tp} GPUs, "
                                   f"{tp} on one node, but the Ray cluster has {total['GPU']:g} GPUs, at most "
                                   f"{per_node['GPU']:g} on one node")
            return {"GPU": tp, "CPU": tp}, None  # a CPU per rank for its host-side work
        cpus = min(int(total["CPU"]) // n, int(per_node["CPU"]))
        if cpus < 1:
            raise RuntimeError(f"data_parallel_size={n} CPU replicas need at least one CPU each, but the Ray cluster "
                               f"has {total['CPU']:g} CPUs")
        return {"CPU": cpus}, cpus

    def _start_replicas(self) -> list[_Replica]:
        from ray.util import placement_group, remove_placement_group
        ray = self._ray
        bundle, num_threads = self._resources()
        self._bundle, self._num_threads = bundle, num_threads
        # one bundle holds all of a replica's GPUs: the engine spawns its tensor-parallel ranks itself, so they
        # must see the actor's CUDA_VISIBLE_DEVICES, on one node (STRICT_PACK)
        replicas = [_Replica(slot, placement_group([bundle], strategy="STRICT_PACK"))
                    for slot in range(self.data_parallel_size)]
        try:
            try:
                ray.get([r.placement_group.ready() for r in replicas], timeout=PLACEMENT_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(f"the Ray cluster did not free {bundle} for each of {len(replicas)} replicas "
                                   f"within {PLACEMENT_TIMEOUT_S:.0f}s; available: {ray.available_resources()}")
            for r in replicas:
                self._spawn(r)
            for r in replicas:
                r.info = self._wait_started(r)
            # every replica must be able to hold any request the driver lets through
            self._config.num_kvcache_blocks = min(r.info.num_kvcache_blocks for r in replicas)
            self._requests_builder = RequestBuilder(self._config, self.tokenizer)
        except BaseException:
            for r in replicas:
                if r.actor is not None:
                    ray.kill(r.actor)
                remove_placement_group(r.placement_group)
            raise
        return replicas

    def _spawn(self, replica: _Replica):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        bundle = self._bundle
        # one call at a time, as on one engine; exit() runs beside it in a group of its own
        actor_class = self._ray.remote(concurrency_groups={"exit": 1})(EngineReplica).options(
            num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0), max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(replica.placement_group, 0))
        options = dict(self._options)
        if self._num_threads is not None:  # a CPU replica stays off any GPU its node has but Ray does not list
            options["device"] = "cpu"
        replica.actor = actor_class.remote(replica.slot, self._model, options, self._num_threads)
        replica.started = replica.actor.info.remote()
        replica.spawned_at = time.monotonic()
        replica.info = None

    def _wait_started(self, replica: _Replica) -> ReplicaInfo:
        ray = self._ray
        try:
            info = ray.get(replica.started, timeout=START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"replica {replica.slot} did not start within {START_TIMEOUT_S:.0f}s") from None
        except ray.exceptions.RayActorError as e:
            raise RuntimeError(f"replica {replica.slot} could not start: {e}") from e
        if self._num_threads is None and info.device != "cuda":
            raise RuntimeError(f"replica {replica.slot} holds GPUs {info.gpu_ids} but its engine runs on "
                               f"{info.device!r}: torch in the actor sees no CUDA device")
        return info

    @property
    def replicas(self) -> list[ReplicaInfo]:
        """The replicas that have started (where they run, their KV cache size)."""
        return [r.info for r in self._live() if r.info is not None]

    @property
    def actors(self) -> list:
        """The replicas' Ray actor handles, by replica."""
        return [r.actor for r in self._live()]

    def _live(self) -> list[_Replica]:
        return [r for r in self._replicas if r.actor is not None]

    # ---- requests ----------------------------------------------------------------------------------------

    def default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**self._config.generation_defaults)

    get_default_sampling_params = default_sampling_params  # vLLM's name

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts: list[str] | list[list[int]] | list[dict],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[dict]:
        requests = self._requests(prompts, sampling_params)
        with self._one_call():
            self._check_open()
            self._draw_seeds(requests)
            return self._run("generate", requests, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template_kwargs: dict | None = None, *, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             tools: list[dict] | None = None) -> list[dict]:
        self._check_open()
        prompts = self._requests_builder.render_chat(messages, chat_template_kwargs, chat_template=chat_template,
                                                     add_generation_prompt=add_generation_prompt,
                                                     continue_final_message=continue_final_message, tools=tools)
        return self.generate(prompts, sampling_params, use_tqdm)

    def stream(self, prompts: list[str] | list[list[int]] | list[dict],
               sampling_params: SamplingParams | list[SamplingParams] | None = None,
               use_tqdm: bool = False) -> Iterator[dict]:
        """The engine's stream events from every replica as they come, "index" being the prompt's place in this
        call. A replica that dies mid-stream is replaced and its unfinished requests run again; as a request's
        outputs do not depend on the replica (its seed is drawn on the driver), what was already sent is skipped."""
        requests = self._requests(prompts, sampling_params)  # bad input raises here, not at the first next()
        return self._stream(requests)

    def _stream(self, requests: list[Request]) -> Iterator[dict]:
        ray = self._ray
        sent: dict[tuple[int, int], list] = {}  # (index, completion) -> [tokens sent, chars sent, finished]
        with self._one_call():
            self._check_open()
            self._draw_seeds(requests)
            for r in self._replicas:
                r.restarts = 0
            live = self._live()
            streams = {}
            for replica, share in zip(live, spread_by_cost([cost(r) for r in requests], [0] * len(live))):
                if share:
                    streams.update(self._start_stream(replica, share, requests))
            try:
                while streams:
                    ready, _ = ray.wait(list(streams), num_returns=1, timeout=POLL_INTERVAL_S)
                    self._check_open()  # exit() from another thread ends the replicas, and this call with them
                    for gen in ready:
                        replica, actor, share, seen = streams[gen]
                        try:
                            events = ray.get(next(gen))
                        except StopIteration:
                            del streams[gen]
                            continue
                        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
                            del streams[gen]
                            streams.update(self._resume_stream(replica, actor, share, sent, requests, e))
                            continue
                        for event in events:
                            out = _unsent(event, share, seen, sent)
                            if out is not None:
                                yield out
                                self._check_open()  # exit() while the caller held the stream
                    self._check_starts()
            finally:
                self._cancel(streams)

    def _start_stream(self, replica: _Replica, share: list[int], requests: list[Request]) -> dict:
        gen = replica.actor.stream.options(num_returns="streaming").remote(
            [requests[i].token_ids for i in share], [requests[i].sampling_params for i in share])
        return {gen: (replica, replica.actor, share, {})}

    def _resume_stream(self, replica: _Replica, actor, share: list[int], sent: dict, requests: list[Request],
                       error) -> dict:
        """Run a dead replica's unfinished requests again, on its replacement or spread over the others."""
        self._check_open()  # a replica that exit() ended is not to be replaced
        finished, started = {}, Counter()  # per request: every started completion finished; how many started
        for (index, _), state in sent.items():
            finished[index] = finished.get(index, True) and state[2]
            started[index] += 1
        unfinished = [i for i in share if not finished.get(i, False) or started[i] < requests[i].sampling_params.n]
        if replica.actor is actor:
            self._replace(replica, actor, error, len(unfinished))
        if not unfinished:
            return {}
        live = [replica] if replica.actor is not None else self._live()
        if not live:
            reasons = "; ".join(f"replica {r.slot}: {r.last_error}" for r in self._replicas)
            raise RuntimeError(f"no data-parallel replica is left to run the requests: {reasons}")
        streams = {}
        for target, part in zip(live, spread_by_cost([cost(requests[i]) for i in unfinished], [0] * len(live))):
            if part:
                streams.update(self._start_stream(target, [unfinished[k] for k in part], requests))
        return streams

    def _run(self, method: str, requests: list[Request], use_tqdm: bool) -> list[dict]:
        """Spread the requests over the replicas, call `method` of each with its share, and gather the outputs in
        input order, running again the shares of replicas that die."""
        results: list[dict | None] = [None] * len(requests)
        request_ids = [str(next(self._request_counter)) for _ in requests]
        for r in self._replicas:
            r.restarts = 0
        jobs = self._submit_spread(method, requests, list(range(len(requests))), {})
        bar = tqdm(total=len(requests), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        start, num_tokens = time.perf_counter(), 0
        try:
            with bar:
                while jobs:
                    ready, _ = self._ray.wait(list(jobs), num_returns=1, timeout=POLL_INTERVAL_S)
                    self._check_open()  # exit() from another thread ends the replicas, and this call with them
                    for ref in ready:
                        job = jobs.pop(ref)
                        outputs = self._collect(ref, job, requests, jobs)
                        for i, out in zip(job.indices, outputs):
                            out["prompt"] = requests[i].prompt  # the replica saw token ids; the text is here
                            out.request_id = request_ids[i]  # the replica numbered its own share
                            results[i] = out
                            num_tokens += sum(len(o["token_ids"]) for o in out["outputs"])
                        bar.update(len(outputs))
                        bar.set_postfix(output=f"{num_tokens / (time.perf_counter() - start):.0f}tok/s")
                    self._check_starts()
        except BaseException:
            self._cancel(jobs)
            raise
        return results

    def _cancel(self, refs):
        """The call ends early (Ctrl-C, an error, a stream left): the replicas drop its work at their next step, so
        the next call runs at once. After exit() there are no replicas left to tell."""
        if not self._closed and self._ray.is_initialized():
            for ref in refs:
                self._ray.cancel(ref)

    def _collect(self, ref, job: _Job, requests: list[Request], jobs: dict) -> list[dict]:
        """The outputs of a finished job; for a job whose replica died, none (its requests are resubmitted)."""
        ray = self._ray
        try:
            return ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:  # lost: its node died
            jobs.update(self._recover(job, e, requests, jobs))
            return []

    def _submit_spread(self, method: str, requests: list[Request], indices: list[int], jobs: dict) -> dict:
        """Jobs for `indices` spread over the live replicas by token count, on top of the work they have."""
        live = self._live()
        if not live:
            reasons = "; ".join(f"replica {r.slot}: {r.last_error}" for r in self._replicas)
            raise RuntimeError(f"no data-parallel replica is left to run the requests: {reasons}")
        loads = [sum(job.cost for job in jobs.values() if job.replica is r) for r in live]
        shares = spread_by_cost([cost(requests[i]) for i in indices], loads)
        return dict(self._submit(r, method, [indices[k] for k in share], requests)
                    for r, share in zip(live, shares) if share)

    def _submit(self, replica: _Replica, method: str, indices: list[int], requests: list[Request]):
        batch = [requests[i] for i in indices]
        call = getattr(replica.actor, method)
        ref = call.remote([r.token_ids for r in batch], [r.sampling_params for r in batch])
        return ref, _Job(replica, replica.actor, method, indices, sum(cost(r) for r in batch))

    def _recover(self, job: _Job, error, requests: list[Request], jobs: dict) -> dict:
        """A replica died with `job` unfinished: restart it once per death (a replacement that fails to start is
        given up) and run the job again there, or spread it over the others."""
        self._check_open()  # a replica that exit() ended is not to be replaced
        replica = job.replica
        if replica.actor is job.actor:  # the first of this actor's jobs to fail: replace the actor
            self._replace(replica, job.actor, error, len(job.indices))
        if replica.actor is not None:
            ref, new_job = self._submit(replica, job.method, job.indices, requests)
            return {ref: new_job}
        return self._submit_spread(job.method, requests, job.indices, jobs)

    def _replace(self, replica: _Replica, actor, error, num_requests: int):
        """A replica's actor died: restart it (once per death, MAX_RESTARTS per call) or give it up; one that never
        came up would not come up again either."""
        started = self._note_started(replica)
        self._ray.kill(actor)
        replica.last_error = str(error)
        restart = started and replica.restarts < MAX_RESTARTS
        what = "restarting it" if restart else "giving it up"
        who = f"pid {replica.info.pid}" if started else "starting"  # also keeps the warnings apart
        warnings.warn(f"data-parallel replica {replica.slot} ({who}) died ({str(error).splitlines()[0]}); {what} "
                      f"and running its {num_requests} unfinished requests again", RuntimeWarning, stacklevel=5)
        with self._spawning:
            self._check_open()  # exit() ran since this call last looked: its release has passed this replica
            if restart:
                replica.restarts += 1
                self._spawn(replica)
            else:
                _retire(replica, replica.last_error)

    def _check_starts(self):
        """Note the replacements that are up; kill one that is not up in time (its node is gone and there is no
        room elsewhere, say), which would otherwise wait forever: its jobs then fail and move on."""
        from ray.util import placement_group_table
        for r in self._live():
            if self._note_started(r):
                continue
            waited = time.monotonic() - r.spawned_at
            placed = placement_group_table(r.placement_group).get("state") == "CREATED"
            if waited > START_TIMEOUT_S or (waited > PLACEMENT_TIMEOUT_S and not placed):
                self._ray.kill(r.actor)

    def _note_started(self, replica: _Replica) -> bool:
        """Whether the replica's engine came up (without waiting)."""
        ray = self._ray
        if replica.info is None and replica.started is not None and ray.wait([replica.started], timeout=0)[0]:
            try:
                replica.info = ray.get(replica.started)
            except ray.exceptions.RayActorError:
                pass  # it died starting: its jobs fail too, and _recover handles them
        return replica.info is not None

    def _requests(self, prompts, sampling_params) -> list[Request]:
        """Tokenized and checked on the driver, with the engine's rules, so a bad request reaches no replica."""
        self._check_open()
        defaults = sampling_params is None
        return self._requests_builder.build(prompts, self.default_sampling_params() if defaults
                                            else sampling_params, defaults)

    def _draw_seeds(self, requests: list[Request]):
        """Seeds for the requests that bring none, drawn once the call runs, as one engine draws them: a call
        refused as busy, or a stream left before its first event, draws none."""
        for r in requests:
            if r.sampling_params.seed is None:
                r.sampling_params = dataclasses.replace(r.sampling_params, seed=self._rng.getrandbits(62))

    # ---- shutting down -----------------------------------------------------------------------------------

    def _check_open(self):
        if self._closed:
            raise RuntimeError(SHUT_DOWN)
        if not self._ray.is_initialized():
            raise RuntimeError("Ray was shut down under this data-parallel LLM (ray.shutdown()), and its replicas "
                               "with it: create a new LLM")

    def exit(self):
        """End the replicas' engines and actors and free their placement groups. Safe to call twice."""
        with self._spawning:  # a replacement being spawned is then in the replicas that the release ends
            if self._closed:
                return
            self._closed = True
        self._finalizer()

    def __enter__(self) -> "DataParallelLLM":
        return self

    def __exit__(self, *exc_info):
        self.exit()

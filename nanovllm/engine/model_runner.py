"""Runs the model for one scheduled batch: builds inputs, calls the model, samples.

Under tensor parallelism rank 0 lives in the user's process and ranks 1..N-1 in spawned worker processes.
Rank 0 forwards every call (method name + arguments) to the workers through a private pipe each, then runs
the same method itself; the ranks meet inside the model's collectives. The process group rendezvous goes
through a fresh temporary file, so two engines on one machine never share a port or a name.
"""
from contextlib import contextmanager
from multiprocessing.connection import Connection

import numpy as np
import torch
import torch.distributed as dist

from nanovllm.config import Config
from nanovllm.engine.cuda_graphs import CUDAGraphRunner
from nanovllm.engine.kv_cache import allocate_kv_cache, detach_kv_cache, num_kvcache_blocks
from nanovllm.engine.sequence import PENDING_TOKEN, Sequence
from nanovllm.layers.backends import create_backend
from nanovllm.layers.sampler import Sampler
from nanovllm.sampling_params import SamplingParams
from nanovllm.models.qwen3 import Qwen3ForCausalLM, head_dim_of
from nanovllm.utils.compile import compiling_on
from nanovllm.utils.context import forward_context
from nanovllm.utils.loader import init_dummy_weights, load_model
from nanovllm.utils.packing import packed_starts
from nanovllm.utils.parallel import tensor_parallel


@contextmanager
def default_dtype_and_device(dtype: torch.dtype, device: torch.device):
    """Build parameters directly in the target dtype and on the target device; restore the defaults after.

    `with torch.device(...)` pops its dispatch mode on exit; set_default_device(cpu) would leave one behind
    that taxes every later torch call in the process."""
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old_dtype)


class SampledTokens:
    """One step's sampled token ids on their way to the host.

    The device-to-host copy is queued right behind the sampler and an event marks its end, so `tolist()` waits
    for this step alone. A plain `.tolist()` on the device tensor would queue its copy behind every step launched
    since (overlapped scheduling launches the next one first) and wait for those too, leaving the device idle
    while the host books the step.
    """

    def __init__(self, ids: torch.Tensor):
        self._ready = None
        if ids.device.type == "cuda":
            self._host = torch.empty(ids.shape, dtype=ids.dtype, device="cpu", pin_memory=True)
            self._host.copy_(ids, non_blocking=True)  # queued on the current stream of ids' device
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(ids.device))
        else:
            self._host = ids

    def tolist(self) -> list[int]:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()


class ModelRunner:

    def __init__(self, config: Config, rank: int, dist_init_file: str | None, conns: list[Connection]):
        self.config = config
        self.rank = rank
        self.world_size = config.tensor_parallel_size
        self.conns = conns  # rank 0: one pipe per worker; a worker: the pipe to rank 0
        self.block_size = config.kvcache_block_size
        self.device = torch.device("cuda", rank) if config.device.type == "cuda" else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world_size > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=f"file://{dist_init_file}",
                                    world_size=self.world_size, rank=rank)
        try:
            self._build()
        except BaseException:
            if dist.is_initialized():
                dist.destroy_process_group()
            raise

    def _build(self):
        config = self.config
        self.graphs = None  # decode runs eagerly until the graphs are captured, the warm-up steps included
        self.last_sampled: torch.Tensor | None = None
        self.head_dim = head_dim_of(config.hf_config)
        self.attn_backend = create_backend(config.attention_backend, self.device)
        self.attn_backend.check_config(self.block_size, self.head_dim, config.torch_dtype)
        with default_dtype_and_device(config.torch_dtype, self.device), tensor_parallel(self.rank, self.world_size):
            self.model = Qwen3ForCausalLM(config.hf_config, config.torch_dtype)
        if config.load_format == "dummy":
            init_dummy_weights(self.model, config.seed + self.rank)
        else:
            load_model(self.model, config.model)
        self.sampler = Sampler()
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        for module in self.model.modules():
            if hasattr(module, "backend"):
                module.backend = self.attn_backend
        if self.device.type == "cuda":
            self.warmup_model()
        self.num_kvcache_blocks = num_kvcache_blocks(config, self.device, self.world_size)
        self.kv_cache = allocate_kv_cache(self.model, config, self.num_kvcache_blocks, self.device)
        if self.device.type == "cuda" or compiling_on(self.device):
            self.warmup_compiled_paths()
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graphs = CUDAGraphRunner(self.model, config, self.device)

    # ---- cross-process calls ------------------------------------------------------------------------------

    def call(self, method: str, *args):
        for conn in self.conns if self.rank == 0 else ():
            conn.send((method, args))
        return getattr(self, method)(*args)

    def loop(self):
        """Worker ranks: serve rank 0's calls until told to exit (or until rank 0 is gone)."""
        while True:
            try:
                method, args = self.conns[0].recv()
            except EOFError:
                break
            getattr(self, method)(*args)
            if method == "exit":
                break

    def exit(self, abort: bool = False):
        """Release graphs, cache and process group. abort: another rank is gone or out of step, so neither wait
        for the device (a collective may never finish) nor for the group."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None
        # drop the cache and the weights now rather than whenever the garbage collector next runs: a later
        # LLM in this process sizes its KV cache from the memory that is free
        if getattr(self, "model", None) is not None:
            detach_kv_cache(self.model)
        self.model = self.kv_cache = self.last_sampled = None
        if self.device.type == "cuda" and not abort:
            torch.cuda.synchronize(self.device)
        if self.world_size > 1 and dist.is_initialized():
            if abort and dist.get_backend() == "nccl":
                try:  # makes NCCL kernels that wait for a dead peer give up
                    dist.distributed_c10d._abort_process_group()
                except Exception:
                    pass
            if dist.is_initialized():
                dist.destroy_process_group()

    # ---- preparing inputs ---------------------------------------------------------------------------------

    def warmup_model(self):
        """One prefill as large as the scheduler allows, so the KV cache is sized after peak activation memory."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        max_len, budget = self.config.max_model_len, self.config.max_num_batched_tokens
        total = min(budget, max_len * self.config.max_num_seqs)
        lens = [max_len] * (total // max_len) + ([total % max_len] if total % max_len else [])
        seqs = [self._dummy_seq(n, cached=0, scheduled=n, in_block_0=False) for n in lens]
        self.run(seqs, True)
        torch.cuda.synchronize(self.device)

    def warmup_compiled_paths(self):
        """Compile, before any real request, every variant that serving could otherwise compile mid-step:
        a plain prefill, a prefill that reads keys from the paged cache (a chunk after a cached part), a
        one-token chunk, and eager decode steps over a short and over the longest context (split-KV decode
        merges partial results only for long ones). Block 0 is scribbled on; no sequence owns it yet."""
        bs, max_len = self.block_size, self.config.max_model_len

        def seq_of(n: int, cached: int, scheduled: int) -> Sequence:
            return self._dummy_seq(n, cached, scheduled, in_block_0=True)

        n = min(bs, max_len)
        self.run([seq_of(n, 0, n), seq_of(n, 0, n)], True)
        for cached in (n // 2, n - 1):
            self.run([seq_of(n, cached, n - cached)], True)
        self.run([seq_of(n, n, 0)], False)
        self.run([seq_of(max_len, max_len, 0)], False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _dummy_seq(self, num_tokens: int, cached: int, scheduled: int, in_block_0: bool) -> Sequence:
        """A warm-up sequence of zeros with `cached` tokens already cached and `scheduled` to run. in_block_0:
        every one of its blocks is block 0 (its K/V is written there); else it has no blocks (nothing stored)."""
        seq = Sequence([0] * num_tokens, SamplingParams(temperature=0.0, max_tokens=1), -1, self.block_size)
        if in_block_0:
            seq.block_table = [0] * -(-num_tokens // self.block_size)
        seq.num_cached_tokens, seq.num_scheduled_tokens = cached, scheduled
        return seq

    def _upload(self, *parts: list[int], temperatures: list[float]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Pack a step's int32 inputs and its temperatures into one host buffer and send it in one copy.

        Many small tensors would each pay an allocation and a copy launch; one pinned buffer pays once. The
        temperatures travel as the bit patterns of float32 values and are viewed back as float32 on the device.
        """
        sizes = [len(p) for p in parts] + [len(temperatures)]
        starts = packed_starts(sizes)
        # filled in place: in pinned memory straight away on CUDA (no second host copy); the gaps are never read
        data = torch.empty(starts[-1], dtype=torch.int32, device="cpu", pin_memory=self.device.type == "cuda")
        host = data.numpy()
        for part, start, size in zip(parts, starts, sizes):
            host[start:start + size] = part
        host[starts[-2]:starts[-2] + sizes[-1]].view(np.float32)[:] = temperatures
        if self.device.type == "cuda":
            data = data.to(self.device, non_blocking=True)
        views = [data[start:start + size] for start, size in zip(starts, sizes)]
        return views[:-1], views[-1].view(torch.float32)

    @staticmethod
    def _block_table_rows(seqs: list[Sequence]) -> tuple[list[int], int]:
        """Block tables padded with -1 to the longest, flattened row by row."""
        width = max(len(seq.block_table) for seq in seqs)
        flat = []
        for seq in seqs:
            flat.extend(seq.block_table)
            flat.extend([-1] * (width - len(seq.block_table)))
        return flat, width

    def prepare_prefill(self, seqs: list[Sequence]):
        """Flatten the scheduled chunk of every sequence into one varlen batch.

            seq A: cached [a0 a1 a2] new [a3 a4]      seq B: new [b0 b1 b2]
            input_ids    = [a3 a4 b0 b1 b2]           positions = [3 4 0 1 2]
            cu_seqlens_q = [0 2 5]   (new tokens)     cu_seqlens_k = [0 5 8]   (all keys each new token may see)
            slot_mapping = cache slot of a3 a4 b0 b1 b2
        """
        input_ids, positions, slot_mapping = [], [], []
        cu_seqlens_q, cu_seqlens_k = [0], [0]
        max_seqlen_q = max_seqlen_k = 0
        for seq in seqs:
            start, end = seq.num_cached_tokens, seq.num_cached_tokens + seq.num_scheduled_tokens
            input_ids.extend(seq[start:end])
            positions.extend(range(start, end))
            cu_seqlens_q.append(cu_seqlens_q[-1] + end - start)
            cu_seqlens_k.append(cu_seqlens_k[-1] + end)
            max_seqlen_q, max_seqlen_k = max(max_seqlen_q, end - start), max(max_seqlen_k, end)
            if seq.block_table:  # warm-up sequences have none
                slot_mapping.extend(self._slots(seq, start, end))
        paged = cu_seqlens_k[-1] > cu_seqlens_q[-1]  # some keys come from the cache
        tables, width = self._block_table_rows(seqs) if paged else ([], 0)
        (input_ids, positions, slot_mapping, cu_seqlens_q, cu_seqlens_k, tables), temperatures = self._upload(
            input_ids, positions, slot_mapping, cu_seqlens_q, cu_seqlens_k, tables,
            temperatures=[seq.temperature for seq in seqs])
        ctx = dict(is_prefill=True, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                   max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, slot_mapping=slot_mapping,
                   block_tables=tables.view(len(seqs), width) if paged else None)
        return input_ids, positions, ctx, temperatures

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        slots, bs = [], self.block_size
        for i in range(start // bs, (end + bs - 1) // bs):
            block_start = seq.block_table[i] * bs
            slots.extend(range(block_start + max(start - i * bs, 0), block_start + min(end - i * bs, bs)))
        return slots

    def prepare_decode(self, seqs: list[Sequence]):
        bs = self.block_size
        input_ids = [seq.last_token for seq in seqs]
        context_lens = [len(seq) for seq in seqs]
        positions = [n - 1 for n in context_lens]
        slot_mapping = [seq.block_table[-1] * bs + (n - 1) % bs for seq, n in zip(seqs, context_lens)]
        # a last token still in flight is read from the previous step's output, on the device
        pending_rows = [seq.pending_row if t == PENDING_TOKEN else -1 for seq, t in zip(seqs, input_ids)]
        has_pending = any(row >= 0 for row in pending_rows)
        tables, width = self._block_table_rows(seqs)
        (input_ids, positions, slot_mapping, context_lens, tables, pending_rows), temperatures = self._upload(
            input_ids, positions, slot_mapping, context_lens, tables, pending_rows if has_pending else [],
            temperatures=[seq.temperature for seq in seqs])
        if has_pending:
            previous = self.last_sampled[pending_rows.clamp(min=0)].to(input_ids.dtype)
            input_ids = torch.where(pending_rows >= 0, previous, input_ids)
        ctx = dict(is_prefill=False, slot_mapping=slot_mapping, context_lens=context_lens,
                   block_tables=tables.view(len(seqs), width))
        return input_ids, positions, ctx, temperatures

    # ---- running -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: dict) -> torch.Tensor | None:
        if not ctx["is_prefill"] and self.graphs is not None and self.graphs.can_run(input_ids.size(0)):
            hidden_states = self.graphs.replay(input_ids, positions, ctx)
            with forward_context(**ctx):
                return self.model.compute_logits(hidden_states)
        with forward_context(**ctx):
            return self.model.compute_logits(self.model(input_ids, positions))

    @torch.inference_mode()
    def launch(self, seqs: list[Sequence], is_prefill: bool) -> SampledTokens | None:
        """Queue one step on the device and return its sampled token ids without waiting for them (rank 0;
        other ranks return None). The result also feeds the next decode step's pending tokens (under tensor
        parallelism with overlapped steps, rank 0 broadcasts it so every rank holds it)."""
        prepare = self.prepare_prefill if is_prefill else self.prepare_decode
        input_ids, positions, ctx, temperatures = prepare(seqs)
        logits = self.run_model(input_ids, positions, ctx)
        if self.rank == 0:
            self.last_sampled = self.sampler(logits, temperatures, self.generator)
        if self.world_size > 1 and self.config.async_scheduling:
            # overlapped steps read a token still in flight on the device, on every rank: share the ids
            if self.rank != 0:
                self.last_sampled = torch.empty(len(seqs), dtype=torch.int64, device=self.device)
            dist.broadcast(self.last_sampled, 0)
        return SampledTokens(self.last_sampled) if self.rank == 0 else None

    @torch.inference_mode()
    def prefill_logits(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """Next-token logits ([num_seqs, vocab], rank 0; None elsewhere) after prefilling the scheduled tokens,
        without sampling: for scoring and for comparing backends. Every rank takes part (use `call`)."""
        input_ids, positions, ctx, _ = self.prepare_prefill(seqs)
        return self.run_model(input_ids, positions, ctx)

    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[int] | None:
        sampled = self.launch(seqs, is_prefill)
        return sampled.tolist() if sampled is not None else None


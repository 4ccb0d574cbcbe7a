"""One rank's model: built once (weights, KV cache, warm-up, CUDA graphs), then each step uploads its inputs,
runs the model (eagerly or by graph replay) and samples. Process management lives in executor.py."""
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from nanovllm.config import Config, head_dim_of
from nanovllm.engine.cuda_graphs import CUDAGraphRunner
from nanovllm.engine.kv_cache import allocate_kv_cache, num_kvcache_blocks
from nanovllm.engine.step import ScheduledStep, StepKind, StepResult
from nanovllm.engine.step_inputs import (Row, SeqState, apply_step, decode_layout, finish_step, prefill_layout)
from nanovllm.layers.attention import attention_layers
from nanovllm.layers.backends import create_backend
from nanovllm.layers.sampler import Sampler
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.compile import compiling_on
from nanovllm.utils.context import Context, forward_context
from nanovllm.utils.loader import init_dummy_weights, load_model
from nanovllm.utils.math import cdiv
from nanovllm.utils.packing import packed_starts
from nanovllm.utils.parallel import tensor_parallel

WARMUP = SamplingParams(temperature=0.0, max_tokens=1)


@contextmanager
def default_dtype_and_device(dtype: torch.dtype, device: torch.device):
    """Build parameters directly in the target dtype and on the target device; restore the defaults after.
    (`with torch.device` pops its mode on exit; set_default_device would tax every later torch call.)"""
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old_dtype)


class SampledTokens:
    """A step's sampled ids on their way to the host: a copy queued right behind the sampler and an event, so
    reading waits for this step alone, not for the steps launched after it."""

    def __init__(self, ids: torch.Tensor):
        self._ready = None
        self._host = ids
        if ids.device.type == "cuda":
            self._host = torch.empty(ids.shape, dtype=ids.dtype, device="cpu", pin_memory=True)
            self._host.copy_(ids, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(ids.device))

    def tolist(self) -> list[int]:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()

    def result(self) -> StepResult:
        return StepResult(self.tolist())


class ModelRunner:

    def __init__(self, config: Config, rank: int, device: torch.device):
        self.config = config
        self.rank = rank
        self.world_size = config.tensor_parallel_size
        self.device = device
        self.on_cuda = device.type == "cuda"
        self.block_size = config.kvcache_block_size
        self.states: dict[int, SeqState] = {}  # every sequence the scheduler has sent and not yet dropped
        self.rows_of_last_step: dict[int, int] = {}  # seq_id -> its row in last_sampled
        self.last_sampled: torch.Tensor | None = None
        self.graphs = None  # decode runs eagerly until the graphs are captured, the warm-up steps included
        self.attn_backend = create_backend(config.attention_backend, device)
        self.attn_backend.check_config(self.block_size, head_dim_of(config.hf_config), config.torch_dtype)
        with default_dtype_and_device(config.torch_dtype, device), tensor_parallel(rank, self.world_size):
            self.model = Qwen3ForCausalLM(config.hf_config, config.torch_dtype)
        if config.load_format == "dummy":
            init_dummy_weights(self.model, config.seed + rank)
        else:
            load_model(self.model, config.model)
        self.layers = attention_layers(self.model)
        for layer in self.layers:
            layer.set_backend(self.attn_backend)
        self.sampler = Sampler()
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        if self.on_cuda:
            self.warmup_model()
        self.num_kvcache_blocks = num_kvcache_blocks(config, device, self.world_size)
        self.kv_cache = allocate_kv_cache(config, self.num_kvcache_blocks, device)
        for i, layer in enumerate(self.layers):
            layer.set_cache(self.kv_cache[0, i], self.kv_cache[1, i])
        if self.on_cuda or compiling_on(device):
            self.warmup_compiled_paths()
        if self.on_cuda and not config.enforce_eager:
            self.graphs = CUDAGraphRunner(self.model, config, device)

    def release(self, wait: bool = True):
        """Drop graphs, cache and weights now rather than at the next garbage collection: a later engine in this
        process sizes its KV cache from the memory that is free. wait=False: another rank may be stuck in a
        collective, so do not wait for the device."""
        if self.graphs is not None:
            self.graphs.release()
        for layer in getattr(self, "layers", ()):
            layer.set_cache(None, None)
        self.graphs = self.model = self.kv_cache = self.last_sampled = self.layers = None
        if self.on_cuda and wait:
            torch.cuda.synchronize(self.device)

    # ---- warm-up ---------------------------------------------------------------------------------------------

    def warmup_model(self):
        """One prefill as large as the scheduler allows, so the KV cache is sized after peak activation memory."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        max_len, budget = self.config.max_model_len, self.config.max_num_batched_tokens
        total = min(budget, max_len * self.config.max_num_seqs)
        lens = [max_len] * (total // max_len) + ([total % max_len] if total % max_len else [])
        self._run_rows([self._warmup_row(n, cached=0, scheduled=n, in_block_0=False) for n in lens],
                       StepKind.PREFILL)
        torch.cuda.synchronize(self.device)

    def warmup_compiled_paths(self):
        """Compile, before any real request, every variant that serving could otherwise compile mid-step: a plain
        prefill, a prefill reading keys from the paged cache, a one-token chunk, and eager decode over a short and
        over the longest context. Block 0 is scribbled on; no sequence owns it yet."""
        n, max_len = min(self.block_size, self.config.max_model_len), self.config.max_model_len

        def rows(*specs):
            return [self._warmup_row(total, cached, scheduled, in_block_0=True) for total, cached, scheduled in specs]

        self._run_rows(rows((n, 0, n), (n, 0, n)), StepKind.PREFILL)
        for cached in (n // 2, n - 1):
            self._run_rows(rows((n, cached, n - cached)), StepKind.PREFILL)
        self._run_rows(rows((n, n - 1, 1)), StepKind.DECODE)
        self._run_rows(rows((max_len, max_len - 1, 1)), StepKind.DECODE)
        if self.on_cuda:
            torch.cuda.synchronize(self.device)

    def _warmup_row(self, num_tokens: int, cached: int, scheduled: int, in_block_0: bool) -> Row:
        """Zeros with `cached` tokens already cached and `scheduled` to run. in_block_0: all its blocks are block
        0 (its K/V is written there); else it has no blocks (nothing stored)."""
        table = [0] * cdiv(num_tokens, self.block_size) if in_block_0 else []
        return Row(-1, SeqState([0] * num_tokens, table, cached, WARMUP), scheduled, 0)

    @torch.inference_mode()  # every step's inputs are inference tensors: compiled ops guard on it
    def _run_rows(self, rows: list[Row], kind: StepKind) -> torch.Tensor | None:
        input_ids, positions, ctx, temperatures = self.prepare(rows, kind)
        logits = self.run_model(input_ids, positions, ctx)
        return self.sampler(logits, temperatures, self.generator) if self.rank == 0 else None

    # ---- a step ----------------------------------------------------------------------------------------------

    def _upload(self, *parts: list[int], temperatures: list[float]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Pack a step's int32 inputs and its temperatures (as float32 bit patterns) into one host buffer and send
        it in one copy (pinned on CUDA, filled in place): many small tensors would each pay an allocation and a
        copy launch."""
        sizes = [len(p) for p in parts] + [len(temperatures)]
        starts = packed_starts(sizes)
        data = torch.empty(starts[-1], dtype=torch.int32, device="cpu", pin_memory=self.on_cuda)
        host = data.numpy()
        for part, start, size in zip(parts, starts, sizes):
            host[start:start + size] = part
        host[starts[-2]:starts[-2] + sizes[-1]].view(np.float32)[:] = temperatures
        data = data.to(self.device, non_blocking=True)
        views = [data[start:start + size] for start, size in zip(starts, sizes)]
        return views[:-1], views[-1].view(torch.float32)

    def prepare(self, rows: list[Row], kind: StepKind) -> tuple[torch.Tensor, torch.Tensor, Context, torch.Tensor]:
        """The step's input ids, positions, attention metadata and temperatures, on the device."""
        temperatures = [row.state.sampling_params.temperature for row in rows]
        if kind == StepKind.PREFILL:
            lay = prefill_layout(rows, self.block_size)
            (ids, pos, slots, cu_q, cu_k, tables), temps = self._upload(
                lay.input_ids, lay.positions, lay.slot_mapping, lay.cu_seqlens_q, lay.cu_seqlens_k,
                lay.block_tables, temperatures=temperatures)
            ctx = Context(True, cu_q, cu_k, lay.max_seqlen_q, lay.max_seqlen_k, slots,
                          block_tables=tables.view(len(rows), lay.width) if lay.width else None)
            return ids, pos, ctx, temps
        lay = decode_layout(rows, self.block_size)
        # a token still in flight is read from the previous step's output, on the device
        pending = [self.rows_of_last_step[r.seq_id] if r.last_token is None else -1 for r in rows]
        in_flight = any(p >= 0 for p in pending)
        (ids, pos, slots, lens, tables, pending), temps = self._upload(
            lay.input_ids, lay.positions, lay.slot_mapping, lay.context_lens, lay.block_tables,
            pending if in_flight else [], temperatures=temperatures)
        if in_flight:
            previous = self.last_sampled[pending.clamp(min=0)].to(ids.dtype)
            ids = torch.where(pending >= 0, previous, ids)
        ctx = Context(False, slot_mapping=slots, context_lens=lens, block_tables=tables.view(len(rows), lay.width))
        return ids, pos, ctx, temps

    @torch.inference_mode()
    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: Context) -> torch.Tensor | None:
        with forward_context(ctx):
            if not ctx.is_prefill and self.graphs is not None and self.graphs.can_run(input_ids.size(0)):
                return self.model.compute_logits(self.graphs.replay(input_ids, positions, ctx))
            return self.model.compute_logits(self.model(input_ids, positions))

    @torch.inference_mode()
    def launch(self, step: ScheduledStep) -> SampledTokens | None:
        """Queue one step on the device; return its sampled ids without waiting for them (rank 0; other ranks
        return None). Under TP with overlapped steps rank 0 broadcasts them: the next step may read them."""
        rows = apply_step(self.states, step)
        sampled = self._run_rows(rows, step.kind)
        finish_step(rows)
        if self.rank == 0:
            self.last_sampled = sampled
        if self.world_size > 1 and self.config.async_scheduling:
            if self.rank != 0:
                self.last_sampled = torch.empty(len(rows), dtype=torch.int64, device=self.device)
            dist.broadcast(self.last_sampled, 0)
        self.rows_of_last_step = {row.seq_id: i for i, row in enumerate(rows)}
        return SampledTokens(self.last_sampled) if self.rank == 0 else None

    def run(self, step: ScheduledStep) -> StepResult | None:
        sampled = self.launch(step)
        return sampled.result() if sampled is not None else None

    @torch.inference_mode()
    def prefill_logits(self, step: ScheduledStep) -> torch.Tensor | None:
        """Next-token logits ([num_seqs, vocab] on rank 0, None elsewhere) after a prefill step, without sampling
        and without keeping the sequences: for scoring. Every rank takes part."""
        rows = apply_step(self.states, step)
        try:
            input_ids, positions, ctx, _ = self.prepare(rows, StepKind.PREFILL)
            return self.run_model(input_ids, positions, ctx)
        finally:
            for row in rows:
                self.states.pop(row.seq_id, None)

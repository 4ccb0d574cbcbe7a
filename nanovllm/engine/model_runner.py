"""One rank's model: built once (weights, KV cache, warm-up, CUDA graphs), then each step uploads its inputs,
runs the model (eagerly or by graph replay) and samples. Process management lives in executor.py."""
from collections.abc import Callable
from contextlib import contextmanager
from time import perf_counter

import torch
import torch.distributed as dist

from nanovllm.config import Config, head_dim_of
from nanovllm.engine.cuda_graphs import CUDAGraphRunner
from nanovllm.engine.kv_cache import allocate_kv_cache, num_kvcache_blocks
from nanovllm.engine.kv_calibration import calibrate_kv_scales, calibration_token_ids
from nanovllm.engine.step import ScheduledStep, StepKind, StepResult
from nanovllm.engine.penalties import OutputHistory, PenaltyTables, has_bad_words, is_penalized
from nanovllm.engine.readback import SampledTokens, StepOutput, last_of_each_row, score_prompts
from nanovllm.engine.step_inputs import Row, SeqState, apply_step, decode_layout, finish_step, prefill_layout
from nanovllm.layers.attention import attention_layers
from nanovllm.layers.kv_quant import KVScales
from nanovllm.layers.backends import create_backend
from nanovllm.layers.sampler import sample, sampler_warm_up_tasks, sampling_tensors
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.context import Context, forward_context
from nanovllm.utils.kernels import fused_kernel, run_warm_up
from nanovllm.utils.loader import init_dummy_weights, load_model
from nanovllm.utils.math import cdiv
from nanovllm.utils.packing import packed_starts
from nanovllm.utils.parallel import SymmMemAllReduce, abandon, create_all_reduce, tensor_parallel

WARMUP = SamplingParams(temperature=0.0, max_tokens=1)


@fused_kernel("inputs", "fill_in_flight")
def fill_in_flight(ids: torch.Tensor, pending: torch.Tensor, last_sampled: torch.Tensor) -> torch.Tensor:
    """ids, but where pending >= 0 the previous step's sample in that row of last_sampled (a token in flight)."""
    previous = last_sampled[pending.clamp(min=0)].to(ids.dtype)
    return torch.where(pending >= 0, previous, ids)


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


class ModelRunner:

    def __init__(self, config: Config, rank: int, device: torch.device):
        start = perf_counter()
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
        self.peers_gone: Callable[[], str | None] | None = None  # rank 0 under TP: see watch_peers
        self.attn_backend = create_backend(config.attention_backend, device, config.kv_cache_dtype, self.block_size,
                                           head_dim_of(config.hf_config), config.torch_dtype)
        self.all_reduce = create_all_reduce(self.world_size, device, config.torch_dtype,
                                            config.max_num_batched_tokens, config.hf_config.hidden_size,
                                            custom=not config.disable_custom_all_reduce)
        with (default_dtype_and_device(config.torch_dtype, device),
              tensor_parallel(rank, self.world_size, self.all_reduce)):
            self.model = Qwen3ForCausalLM(config.hf_config, config.torch_dtype)
        if config.load_format == "dummy":
            init_dummy_weights(self.model, config.seed + rank)
        else:
            load_model(self.model, config.model)
        weights = perf_counter()
        self.layers = attention_layers(self.model)
        for layer in self.layers:
            layer.set_backend(self.attn_backend)
        self.penalties = PenaltyTables(config.hf_config.vocab_size, device)
        self.penalized: set[int] = set()  # sequences with a penalty: the common step checks one empty set
        self.history = OutputHistory(config.max_model_len, device)
        self.bad_worded: set[int] = set()  # sequences with bad words, likewise
        if self.on_cuda:
            self.warmup_model()
        kv_scales = self.calibrate_kv_scales() if config.kv_cache_dtype != "auto" else [None] * len(self.layers)
        self.num_kvcache_blocks = num_kvcache_blocks(config, device, self.world_size)
        hf = config.hf_config
        key_major_values = self.attn_backend.key_major_values(
            self.block_size, head_dim_of(hf), config.torch_dtype, config.kv_cache_dtype,
            hf.num_attention_heads // hf.num_key_value_heads)
        self.kv_cache = allocate_kv_cache(config, self.num_kvcache_blocks, device,
                                          head_major=self.attn_backend.head_major_blocks,
                                          key_major_values=key_major_values)
        for i, layer in enumerate(self.layers):
            layer.set_cache(self.kv_cache[0][i], self.kv_cache[1][i], kv_scales[i])
        if self.on_cuda:  # nothing compiles on the CPU
            self.warmup_compiled_paths()
        warm = perf_counter()
        if self.on_cuda and not config.enforce_eager:
            self.graphs = CUDAGraphRunner(self.model, config, device, ordered=self.attn_backend.orders_decode)
        self.start_up_seconds = {"weights": weights - start, "warm-up and compile": warm - weights,
                                 "graph capture": perf_counter() - warm}

    def watch_peers(self, peers_gone: Callable[[], str | None]):
        """Rank 0 under TP: reading a step's tokens back checks `peers_gone` (why a peer is gone, or None) while it
        waits, and raises instead of waiting forever for collectives a dead rank never joins."""
        self.peers_gone = peers_gone

    def release(self, wait: bool = True):
        """Drop graphs, cache and weights now rather than at the next garbage collection: a later engine in this
        process sizes its KV cache from the memory that is free. wait=False: another rank may be stuck in a
        collective, so do not wait for the device."""
        if not wait and isinstance(self.all_reduce, SymmMemAllReduce):
            # a kernel may wait forever for a dead peer, and freeing symmetric memory (or a graph's pool) waits
            # for the device: keep all of it until the process exits, when torch skips the free
            abandon(self.graphs, self.model, self.kv_cache, self.all_reduce)
            self.graphs = None
        if self.graphs is not None:
            self.graphs.release()
        for layer in getattr(self, "layers", ()):
            layer.set_cache(None, None)
        self.graphs = self.model = self.kv_cache = self.last_sampled = self.layers = self.all_reduce = None
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

    def calibrate_kv_scales(self) -> list[KVScales]:
        """An fp8 cache's scales, from one prefill of seeded random tokens; the cache does not exist yet, so
        nothing is stored."""
        ids = calibration_token_ids(self.config.hf_config.vocab_size, self.config.max_model_len)
        row = Row(-1, SeqState(ids, [], 0, WARMUP, len(ids)), len(ids), 0)
        return calibrate_kv_scales(self.layers, lambda: self._run_rows([row], StepKind.PREFILL))

    def warmup_compiled_paths(self):
        """Compile, before any real request, every variant that serving could otherwise compile mid-step: a plain
        prefill, a prefill reading keys from the paged cache, a one-token chunk, eager decode over a short and over
        the longest context, the sampler's kinds (rank 0), the in-flight token fill and the GEMMs' kernels
        (warm_gemm_kernels). The steps run at once on one GPU (run_warm_up: their Triton compiles in parallel); they
        all scribble on block 0, which no sequence owns yet, and their outputs are dropped."""
        n, max_len = min(self.block_size, self.config.max_model_len), self.config.max_model_len

        def step(kind: StepKind, *specs: tuple[int, int, int]) -> Callable[[], None]:
            rows = [self._warmup_row(total, cached, scheduled, in_block_0=True) for total, cached, scheduled in specs]
            return lambda: self._run_rows(rows, kind)

        def in_flight_fill():  # overlapped steps read tokens still in flight through fill_in_flight
            ids, pending = self._upload([0], [0])
            fill_in_flight(ids, pending, torch.zeros(1, dtype=torch.int64, device=self.device))

        tasks = [step(StepKind.PREFILL, (n, 0, n), (n, 0, n)),
                 *(step(StepKind.PREFILL, (n, cached, n - cached)) for cached in (n // 2, n - 1)),
                 step(StepKind.DECODE, (n, n - 1, 1)), step(StepKind.DECODE, (max_len, max_len - 1, 1)),
                 in_flight_fill, self.warm_gemm_kernels]
        if self.rank == 0:
            tasks += sampler_warm_up_tasks(self.config.hf_config.vocab_size, self.config.torch_dtype, self.device)
        run_warm_up(tasks, self.device, concurrently=self.world_size == 1)
        if self.on_cuda:
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def warm_gemm_kernels(self):
        """Run each distinct projection of the model (its weight shape, with or without bias; the LM head too) once
        at every row count from 1 to max_num_seqs (at most 512, the largest decode graph), on this rank's shard and
        without collectives. cuBLAS holds the host until the device is idle the first time it runs one of its
        kernels, and it picks another kernel every few rows (the LM head: every 8), so before this the first step
        at each new count (a prefill step's logits rows, a decode step's batch, an eager step) stopped the
        overlapped loop: the device idled while the host prepared the next step. A prefill step's token count, up
        to max_num_batched_tokens, is left to chance (its larger GEMMs change kernel rarely)."""
        linears = {}
        for module in self.model.modules():
            packed, weight = getattr(module, "packed", None), getattr(module, "weight", None)
            if packed is not None and weight is not None:
                bias = getattr(module, "bias", None)
                linears.setdefault((tuple(weight.shape), bias is not None), (packed, weight, bias))
        rows = min(self.config.max_num_seqs, 512)  # bounds the start-up: the 8B head reads 1.2 GB a call
        for packed, weight, bias in linears.values():
            x = torch.zeros(rows, weight.size(1), dtype=weight.dtype, device=weight.device)
            for m in range(1, rows + 1):
                packed.linear(x[:m], weight, bias)

    def _warmup_row(self, num_tokens: int, cached: int, scheduled: int, in_block_0: bool) -> Row:
        """Zeros with `cached` tokens already cached and `scheduled` to run. in_block_0: all its blocks are block
        0 (its K/V is written there); else it has no blocks (nothing stored)."""
        table = [0] * cdiv(num_tokens, self.block_size) if in_block_0 else []
        return Row(-1, SeqState([0] * num_tokens, table, cached, WARMUP, num_tokens), scheduled, 0)

    @torch.inference_mode()
    def _run_rows(self, rows: list[Row], kind: StepKind) -> StepOutput | None:
        """Run a step's rows and sample (rank 0; other ranks return None)."""
        input_ids, positions, ctx, logits_indices, scores_prompts = self.prepare(rows, kind)
        logits = self.run_model(input_ids, positions, ctx, logits_indices)
        if self.rank != 0:
            return None
        prompt_logprobs = None
        if scores_prompts:  # rows scored their prompt tokens too
            last = torch.tensor(last_of_each_row(rows), device=self.device)
            prompt_logprobs = score_prompts(rows, logits)
            logits = logits[last]
        counts = prompt_mask = slots = None
        if self.penalized and any(row.seq_id in self.penalized for row in rows):
            counts, prompt_mask, slots = self.penalties.tables(rows)
        params = [row.state.sampling_params for row in rows]
        tensors = sampling_tensors(params, [row.state.seed for row in rows], [row.output_position for row in rows],
                                   self.device, self.config.eos, counts, prompt_mask)
        history_slots = None
        if self.bad_worded and any(row.seq_id in self.bad_worded for row in rows):
            bans, history_slots = self.history.bans(rows)
            if bans is not None:
                tensors.bad_word_rows, tensors.bad_word_token_ids, tensors.bad_word_hits = bans
        out = sample(logits, tensors)
        if slots is not None:
            self.penalties.count(out.token_ids, rows, slots)
        if history_slots is not None:
            self.history.record(out.token_ids, rows, history_slots)
        return StepOutput(out, [p.logprobs for p in params], prompt_logprobs, [p.prompt_logprobs for p in params])

    # ---- a step ----------------------------------------------------------------------------------------------

    def _upload(self, *parts: list[int]) -> list[torch.Tensor]:
        """Pack a step's int32 inputs into one host buffer and send it in one copy (pinned on CUDA, filled in
        place): many small tensors would each pay an allocation and a copy launch."""
        sizes = [len(p) for p in parts]
        starts = packed_starts(sizes)
        data = torch.empty(starts[-1], dtype=torch.int32, device="cpu", pin_memory=self.on_cuda)
        host = data.numpy()
        for part, start, size in zip(parts, starts, sizes):
            host[start:start + size] = part
        data = data.to(self.device, non_blocking=True)
        return [data[start:start + size] for start, size in zip(starts, sizes)]

    def prepare(self, rows: list[Row], kind: StepKind) -> tuple[torch.Tensor, torch.Tensor, Context,
                                                                 torch.Tensor | None, bool]:
        """The step's input ids, positions, attention metadata, (prefill) which tokens need logits, and whether
        some row scores its prompt."""
        # a token still in flight (input id -1) is read from the previous step's output, on the device
        in_flight = any(r.last_token is None for r in rows)
        ordered = self.attn_backend.orders_decode
        if kind == StepKind.PREFILL:
            lay = prefill_layout(rows, self.block_size, self.attn_backend.decodes_in_mixed_steps, ordered)
            pending = self._pending_rows(rows, lay.input_ids) if in_flight else []
            ids, pos, slots, cu_q, cu_k, tables, logits_indices, pending, lens, tail_tables, order = self._upload(
                lay.input_ids, lay.positions, lay.slot_mapping, lay.cu_seqlens_q, lay.cu_seqlens_k,
                lay.block_tables, lay.logits_indices, pending, lay.decode_context_lens, lay.decode_block_tables,
                lay.decode_order)
            ctx = Context(True, cu_q, cu_k, lay.max_seqlen_q, lay.max_seqlen_k, slots,
                          block_tables=tables.view(len(rows), lay.width) if lay.width else None)
            if lay.decode_context_lens:
                ctx.num_decode_rows = len(lay.decode_context_lens)
                ctx.context_lens = lens
                ctx.decode_block_tables = tail_tables.view(ctx.num_decode_rows, lay.width)
                ctx.decode_order = order if ordered else None
            ids = fill_in_flight(ids, pending, self.last_sampled) if in_flight else ids
            return ids, pos, ctx, logits_indices, lay.scores_prompts
        lay = decode_layout(rows, self.block_size, ordered)
        pending = self._pending_rows(rows, lay.input_ids) if in_flight else []
        ids, pos, slots, lens, tables, order, pending = self._upload(
            lay.input_ids, lay.positions, lay.slot_mapping, lay.context_lens, lay.block_tables, lay.order, pending)
        ctx = Context(False, slot_mapping=slots, context_lens=lens, block_tables=tables.view(len(rows), lay.width),
                      decode_order=order if ordered else None)
        return fill_in_flight(ids, pending, self.last_sampled) if in_flight else ids, pos, ctx, None, False

    def _pending_rows(self, rows: list[Row], input_ids: list[int]) -> list[int]:
        """Per input token: the row of the previous step's output that holds it (-1: known here)."""
        pending = [-1] * len(input_ids)
        at = 0
        for row in rows:
            at += row.num_tokens
            if row.last_token is None:
                pending[at - 1] = self.rows_of_last_step[row.seq_id]
        return pending

    @torch.inference_mode()
    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: Context,
                  logits_indices: torch.Tensor | None) -> torch.Tensor | None:
        """Logits of each decode token, or of the prefill tokens at logits_indices (rank 0; None elsewhere)."""
        with forward_context(ctx):
            if not ctx.is_prefill and self.graphs is not None and self.graphs.can_run(input_ids.size(0)):
                return self.model.compute_logits(self.graphs.replay(input_ids, positions, ctx))
            hidden_states = self.model(input_ids, positions)
            if logits_indices is not None:
                hidden_states = hidden_states[logits_indices]
            return self.model.compute_logits(hidden_states)

    @torch.inference_mode()
    def launch(self, step: ScheduledStep) -> SampledTokens | None:
        """Queue one step on the device; return its sampled ids without waiting for them (rank 0; other ranks
        return None). Under TP with overlapped steps rank 0 broadcasts them: the next step may read them."""
        for seq_id in step.finished_seq_ids:
            self.penalties.drop(seq_id)
            self.penalized.discard(seq_id)
            self.history.drop(seq_id)
            self.bad_worded.discard(seq_id)
        rows = apply_step(self.states, step)
        self.penalized.update(row.seq_id for row in rows[:len(step.new)] if is_penalized(row))
        self.bad_worded.update(row.seq_id for row in rows[:len(step.new)] if has_bad_words(row))
        output = self._run_rows(rows, step.kind)
        finish_step(rows)
        if self.rank == 0:
            self.last_sampled = output.sampler.token_ids
        if self.world_size > 1 and self.config.async_scheduling:
            if self.rank != 0:
                self.last_sampled = torch.empty(len(rows), dtype=torch.int64, device=self.device)
            dist.broadcast(self.last_sampled, 0)
        self.rows_of_last_step = {row.seq_id: i for i, row in enumerate(rows)}
        return SampledTokens(output, self.peers_gone) if self.rank == 0 else None

    def run(self, step: ScheduledStep) -> StepResult | None:
        sampled = self.launch(step)
        return sampled.result() if sampled is not None else None

    @torch.inference_mode()
    def prefill_logits(self, step: ScheduledStep) -> torch.Tensor | None:
        """Next-token logits ([num_seqs, vocab] on rank 0, None elsewhere) after a prefill step, without sampling
        and without keeping the sequences: for scoring. Every rank takes part."""
        rows = apply_step(self.states, step)
        try:
            input_ids, positions, ctx, logits_indices, _ = self.prepare(rows, StepKind.PREFILL)
            return self.run_model(input_ids, positions, ctx, logits_indices)
        finally:
            for row in rows:
                self.states.pop(row.seq_id, None)


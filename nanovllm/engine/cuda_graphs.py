"""CUDA graphs for decode steps: one graph per batch size, all sharing one memory pool.

A decode step of n sequences replays the smallest captured graph of batch size >= n. Inputs are copied into
static buffers (one kernel on CUDA, `stage_decode_inputs`); the padded rows get slot -1 (nothing stored) and
context length 0, and every block-table column past a row's own blocks is reset to -1 so no stale block id of
an earlier step survives.

    block_tables (static, width = blocks of max_model_len)
        row 0 | 7  3 12 -1 -1 ... |   <- this step's rows, rest cleared
        row 1 | 5 -1 -1 -1 -1 ... |
        row 2 | -1 ...            |   <- padding row (context length 0)
"""
import torch

from nanovllm.config import Config
from nanovllm.utils.context import Context, forward_context
from nanovllm.utils.kernels import fused_kernel
from nanovllm.utils.math import cdiv
from nanovllm.utils.packing import packed_starts


@fused_kernel("inputs", "stage_decode_inputs")
def stage_decode_inputs(input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                        context_lens: torch.Tensor, block_tables: torch.Tensor, decode_order: torch.Tensor | None,
                        static_ids: torch.Tensor, static_positions: torch.Tensor, static_slots: torch.Tensor,
                        static_lens: torch.Tensor, static_tables: torch.Tensor, static_order: torch.Tensor,
                        bs: int) -> None:
    """A decode step's n rows into the first n of a graph's static inputs of batch size bs; rows n..bs-1 are
    padding (slot -1, context length 0, their own index in the order). Block-table columns past the step's width
    become -1. decode_order None: the rows in batch order."""
    n, width = block_tables.shape
    static_ids[:n] = input_ids
    static_positions[:n] = positions
    static_slots[:bs].fill_(-1)
    static_slots[:n] = slot_mapping
    static_lens[:bs].zero_()
    static_lens[:n] = context_lens
    static_tables[:bs].fill_(-1)
    static_tables[:n, :width] = block_tables
    static_order[:bs] = torch.arange(bs, dtype=static_order.dtype, device=static_order.device)
    if decode_order is not None:
        static_order[:n] = decode_order


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    limit = min(max_num_seqs, 512)
    sizes = [bs for bs in (1, 2, 4, 8) if bs <= limit] + list(range(16, limit + 1, 16))
    if sizes[-1] < limit:
        sizes.append(limit)
    return sizes


class CUDAGraphRunner:

    @torch.inference_mode()
    def __init__(self, model, config: Config, device: torch.device, ordered: bool = False):
        """ordered: decode steps come with a decode_order (AttentionBackend.orders_decode)."""
        self.model = model
        self.batch_sizes = graph_batch_sizes(config.max_num_seqs)
        max_bs = self.batch_sizes[-1]
        max_blocks = cdiv(config.max_model_len, config.kvcache_block_size)
        hidden = config.hf_config.hidden_size
        kw = dict(device=device)
        # token ids and positions packed in one int32 buffer like an eager step's (see packed_starts), so
        # capture reuses the kernels compiled for eager steps (int64 positions would compile new ones)
        ids_at, positions_at, end = packed_starts([max_bs, max_bs])
        packed = torch.zeros(end, dtype=torch.int32, **kw)
        self.input_ids, self.positions = packed[ids_at:ids_at + max_bs], packed[positions_at:positions_at + max_bs]
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int32, **kw)
        self.context_lens = torch.zeros(max_bs, dtype=torch.int32, **kw)
        self.block_tables = torch.full((max_bs, max_blocks), -1, dtype=torch.int32, **kw)
        self.decode_order = torch.arange(max_bs, dtype=torch.int32, **kw)
        self.outputs = torch.zeros(max_bs, hidden, dtype=config.torch_dtype, **kw)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self._capture_all()
        self._compile_staging(ordered)

    def _context(self, bs: int) -> Context:
        return Context(False, slot_mapping=self.slot_mapping[:bs], context_lens=self.context_lens[:bs],
                       block_tables=self.block_tables[:bs], decode_order=self.decode_order[:bs])

    @torch.inference_mode()
    def _capture_all(self):
        for bs in reversed(self.batch_sizes):  # largest first, so the smaller graphs fit in its pool
            graph = torch.cuda.CUDAGraph()
            with forward_context(self._context(bs)):
                self.outputs[:bs] = self.model(self.input_ids[:bs], self.positions[:bs])  # warm-up
            # a fresh context: what the warm-up's first layer built for the others (ctx.plan) is built again,
            # inside the graph, from the graph's own inputs
            with forward_context(self._context(bs)), torch.cuda.graph(graph, self.pool):
                self.outputs[:bs] = self.model(self.input_ids[:bs], self.positions[:bs])
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
            torch.cuda.synchronize()

    def _compile_staging(self, ordered: bool):
        """Compile stage_decode_inputs now rather than at the first replay: one padding row (slot -1, context
        length 0), in fresh (aligned) tensors like a step's uploaded parts. Every replay overwrites it."""
        one = [torch.full((1,), v, dtype=torch.int32, device=self.input_ids.device) for v in (0, 0, -1, 0, -1, 0)]
        ids, positions, slots, lens, tables, order = one
        stage_decode_inputs(ids, positions, slots, lens, tables.view(1, 1), order if ordered else None,
                            self.input_ids, self.positions, self.slot_mapping, self.context_lens, self.block_tables,
                            self.decode_order, 1)

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.batch_sizes[-1]

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: Context) -> torch.Tensor:
        n = input_ids.size(0)
        bs = next(b for b in self.batch_sizes if b >= n)
        stage_decode_inputs(input_ids, positions, ctx.slot_mapping, ctx.context_lens, ctx.block_tables,
                            ctx.decode_order, self.input_ids, self.positions, self.slot_mapping, self.context_lens,
                            self.block_tables, self.decode_order, bs)
        self.graphs[bs].replay()
        return self.outputs[:n]

    def release(self):
        self.graphs.clear()
        self.pool = None

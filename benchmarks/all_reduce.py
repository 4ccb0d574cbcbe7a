"""Time the tensor-parallel all-reduce at decode message sizes: NCCL against torch's one-shot and two-shot kernels
over symmetric memory, each as a CUDA graph of back-to-back calls (the way decode steps replay them), and check that
the one-shot sum is bit-equal to NCCL's.

    python benchmarks/all_reduce.py --world-size 2 [--dtype bfloat16] [--sizes-kib 8 64 512 2048 8192]

NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1) unless the environment says
otherwise.
"""
import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CALLS_PER_GRAPH = 20
REPLAYS = 20


def graph_time_us(fn, x: torch.Tensor) -> float:
    """Mean time of one call, from a graph of CALLS_PER_GRAPH calls replayed REPLAYS times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS_PER_GRAPH):
            fn(x)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (REPLAYS * CALLS_PER_GRAPH)


def worker(rank: int, world: int, init_file: str, dtype_name: str, sizes_kib: list[int]):
    import torch.distributed._symmetric_memory as symm_mem
    from nanovllm.utils.parallel import SymmMemAllReduce
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", world_size=world, rank=rank,
                            device_id=device)
    dtype = getattr(torch, dtype_name)
    itemsize = dtype.itemsize
    largest = max(sizes_kib) * 1024 // itemsize
    one_shot = SymmMemAllReduce(largest, dtype, device)
    two_shot_buf = symm_mem.empty(largest, dtype=dtype, device=device)
    symm_mem.rendezvous(two_shot_buf, one_shot.group_name)
    if rank == 0:
        print(f"{world} ranks, {dtype_name}, peer access {torch.cuda.can_device_access_peer(0, 1)}, "
              f"symmetric memory backend {symm_mem.get_backend(device)}")
        print(f"{'KiB':>7} {'NCCL us':>8} {'one-shot':>9} {'two-shot':>9}  one-shot == NCCL")

    def nccl(x):
        dist.all_reduce(x)

    def two_shot(x):
        buf = two_shot_buf[:x.numel()]
        buf.copy_(x.view(-1))
        torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", one_shot.group_name)

    gen = torch.Generator(device=device).manual_seed(1234 + rank)
    for kib in sizes_kib:
        n = kib * 1024 // itemsize
        x = torch.randn(n // 1024 if n >= 1024 else 1, min(n, 1024), device=device, dtype=dtype, generator=gen)
        want = x.clone()
        dist.all_reduce(want)
        got = one_shot(x)
        equal = torch.equal(got, want)
        t_nccl = graph_time_us(nccl, x.clone())
        t_one = graph_time_us(one_shot, x)
        t_two = graph_time_us(two_shot, x)
        if rank == 0:
            print(f"{kib:>7} {t_nccl:>8.1f} {t_one:>9.1f} {t_two:>9.1f}  {equal}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--sizes-kib", type=int, nargs="+", default=[8, 32, 128, 256, 512, 1024, 2048, 4096, 8192, 16384])
    args = p.parse_args()
    if torch.cuda.device_count() < args.world_size:
        raise SystemExit(f"all_reduce.py: needs {args.world_size} GPUs, found {torch.cuda.device_count()}")
    for name, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                        ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(name, value)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args.world_size, os.path.join(tmp, "init"), args.dtype, args.sizes_kib),
                 nprocs=args.world_size)


if __name__ == "__main__":
    main()

"""The tensor-parallel all-reduce a group gets (utils/parallel.py), where that needs no GPU: one rank has none, the
CPU sums through torch.distributed, and disable_custom_all_reduce=True picks NCCL without asking the other ranks.
The symmetric-memory path itself is tested on two GPUs (test_tp_cuda.py)."""
import torch

from nanovllm.utils.parallel import AllReduce, create_all_reduce


def test_one_rank_has_no_all_reduce():
    assert create_all_reduce(1, torch.device("cpu"), torch.float32, 16, 64, custom=True) is None


def test_cpu_group_sums_through_torch_distributed():
    reducer = create_all_reduce(2, torch.device("cpu"), torch.float32, 16, 64, custom=True)
    assert type(reducer) is AllReduce and reducer.why_not_custom == ""


def test_disabled_custom_all_reduce_is_nccl_with_its_reason():
    # no process group exists here: the choice must not need a collective
    reducer = create_all_reduce(2, torch.device("cuda", 0), torch.bfloat16, 16, 64, custom=False)
    assert type(reducer) is AllReduce and reducer.why_not_custom == "disable_custom_all_reduce=True"

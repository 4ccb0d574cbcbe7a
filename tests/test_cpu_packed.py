"""bf16 linear layers on the CPU through oneDNN's packed weights: bit-identical to F.linear, and never stale."""
import pytest
import torch
import torch.nn.functional as F

from nanovllm.layers.cpu_packed import CPU_CHUNK_TOKENS, PackedWeight, in_token_chunks, packing_works
from nanovllm.layers.linear import ReplicatedLinear

needs_packing = pytest.mark.skipif(not packing_works(), reason="this torch build or CPU has no oneDNN bf16 linear")


@needs_packing
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_packed_bf16_linear_equals_f_linear_bit_for_bit(bias, rows):
    gen = torch.Generator().manual_seed(rows)
    layer = ReplicatedLinear(96, 40, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(rows, 96, generator=gen).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@needs_packing
def test_packed_copy_follows_in_place_weight_changes():
    weight = torch.randn(16, 8).to(torch.bfloat16)
    x = torch.randn(3, 8).to(torch.bfloat16)
    packed = PackedWeight()
    packed.linear(x, weight)
    weight.mul_(2)  # what a weight loader's copy_ does to the version counter
    assert torch.equal(packed.linear(x, weight), F.linear(x, weight))


def test_float32_keeps_f_linear():
    weight, x = torch.randn(16, 8), torch.randn(3, 8)
    assert torch.equal(PackedWeight().linear(x, weight), F.linear(x, weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [CPU_CHUNK_TOKENS, CPU_CHUNK_TOKENS + 1, 3 * CPU_CHUNK_TOKENS - 5])
def test_token_chunks_give_the_whole_result_in_even_chunks(dtype, rows):
    """A long prefill's MLP runs in chunks on the CPU: the same bits as one call, chunks within one row of each
    other in size (no one-row sliver, which may take another GEMM kernel)."""
    gen = torch.Generator().manual_seed(rows)
    layer = ReplicatedLinear(96, 200).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
    x = torch.randn(rows, 96, generator=gen).to(dtype)
    sizes = []

    def mlp_like(part):
        sizes.append(part.size(0))
        return layer(part).relu()  # exact element-wise work: a vectorised exp's bits may depend on the position

    with torch.inference_mode():
        assert torch.equal(in_token_chunks(mlp_like, x), layer(x).relu())
    assert sum(sizes) == rows and max(sizes) <= CPU_CHUNK_TOKENS and max(sizes) - min(sizes) <= 1
    assert len(sizes) == -(-rows // CPU_CHUNK_TOKENS)

from nanovllm.utils.math import cdiv


def packed_starts(sizes: list[int]) -> list[int]:
    """Where each of several int32 parts starts when packed into one buffer, and the buffer's length last.

    Every part starts 16-byte aligned (a multiple of 4 elements): Triton specialises kernels on pointer
    alignment. A step's inputs (ModelRunner._upload) and the CUDA graphs' static inputs share this layout, so
    both meet the same compiled variants.
    """
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + cdiv(n, 4) * 4)
    return starts

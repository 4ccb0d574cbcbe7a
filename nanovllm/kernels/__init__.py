"""Our own Triton kernels: paged KV-cache store and paged/varlen attention."""

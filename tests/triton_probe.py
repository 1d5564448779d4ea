"""A minimal Triton kernel for tests/triton_suite_common.py's check of Triton's interpreter (a module of its own:
it imports triton, and a jitted function must see ``triton.language`` as a global)."""

import triton
import triton.language as tl


@triton.jit
def probe(out, n, BLOCK: tl.constexpr):
    """``out[:BLOCK] = n`` by adding 1.0 ``n`` times: a loop over a bound given at run time."""
    acc = tl.zeros((BLOCK,), tl.float32)
    for _ in range(0, n):
        acc += 1.0
    tl.store(out + tl.arange(0, BLOCK), acc)

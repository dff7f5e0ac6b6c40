"""Programmatic dependent launch (Hopper+) inside our kernels; the host side is ``host.chains``."""

import triton
import triton.language as tl


@triton.jit
def chain(WAIT: tl.constexpr, TRIGGER: tl.constexpr):
    """WAIT blocks until the previous kernel has finished and its writes are visible (this kernel was
    launched with launch_pdl, so it may start before then): it comes before the kernel's first load.
    TRIGGER lets the next kernel launch once every program of this one has passed here; the next one
    waits on the GPU rather than being launched after this one ends."""
    if WAIT:
        tl.extra.cuda.gdc_wait()
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()

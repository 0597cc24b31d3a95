"""Peak resident memory of this process (no JAX import: the torch reference worker uses it too)."""

from __future__ import annotations

import resource


def peak_rss_bytes() -> int:
    """VmHWM from /proc (this process image only); ru_maxrss would also count a parent's peak,
    which Linux carries into children across fork and exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

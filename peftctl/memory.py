"""Keeping a CPU training run's resident memory near what it uses, through glibc's malloc.

PyTorch on CPU frees and allocates tensors of a different size every step; what glibc does
with the freed blocks decides how far the process's resident size drifts above its real need.
Both functions do nothing off glibc.
"""

from __future__ import annotations


# The glibc tunables release_freed_memory sets (bytes); the benchmark gives every contender the same.
MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 1024 * 1024 * 1024


def release_freed_memory() -> None:
    """Give blocks of MMAP_THRESHOLD and more mappings of their own, returned to the OS when freed,
    and keep the smaller ones on the heap for the next step.

    PyTorch on CPU allocates activations of a different size every step (batches vary in
    length). With glibc's adaptive thresholds (up to 32 MiB) the big ones land on the heap too and
    fragment it: the resident size of a SmolLM2 run grew from 1.4 to 2.1 GB over 25 steps. With
    64 MiB here, 1.31 to 1.52 GB over 60 steps of the benchmark. At 1 MiB (this function's earlier
    value) every fresh activation of a megabyte or more is a new mapping, page-faulted in on first
    write, ~25,000 faults a step: on a virtualized AMD host a fresh 1.3 MB copy took 0.53 ms
    against 0.03 ms in reused heap memory, and the step's profiled time fell by a fifth without
    them. 4 MiB keeps every activation of a SmolLM2 step on the heap (~3,500 faults a step) for
    +13 MiB of peak (60 steps); what still gets a mapping is the few large blocks (the head's
    logits are reused by loss.HeadCrossEntropy). The trim threshold keeps glibc from handing the
    heap's free top back between steps (only to fault it in again); return_free_heap trims once
    training is done. No-op off glibc.
    """
    libc = _glibc()
    if libc is not None:
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)
        libc.mallopt(m_trim_threshold, TRIM_THRESHOLD)


def return_free_heap() -> None:
    """Give the heap's free pages back to the OS (malloc_trim) once training is done, so that what
    runs next (validation, export, generation) does not start on top of a fragmented heap: the
    resident size after a SmolLM2 benchmark run fell from 1.52 to 0.88 GB. Per step it would cost
    ~15% of the step time in refaulted pages, for a peak only 10% lower."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc():
    """The C library when it is glibc (whose malloc tunables the functions above set), else None."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def peak_memory_bytes() -> int:
    """This process's peak memory so far: on a GPU the most CUDA memory its tensors held at once
    (the allocator's cache not counted), else its peak resident size (all of it: Python, the
    libraries, the weights, the steps' activations), which the kernel keeps for every process."""
    import resource
    import sys

    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def kept_for_backward(forward, exclude=()):
    """Run `forward()` and count what autograd keeps of it for the backward pass: (its result, the
    bytes of the distinct tensor storages saved during it, those of `exclude` left out, e.g. the
    model's weights, which are held anyway). Exact, unlike a process's resident size; plan's
    activation figures (activations.py) are checked against it."""
    import torch

    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        result = forward()
    held = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    return result, sum(size for ptr, size in storages.items() if ptr not in held)

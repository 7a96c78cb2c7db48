"""One compute thread per process, for torch's intra-op pool and numpy's BLAS alike.

With a second thread on a busy 2-core machine (the broker, other agents, a parser
process) every barrier waits for a descheduled thread: the demo measured training
18x slower with two OpenMP threads. Each process here does one thing at a time.
"""

from __future__ import annotations


def use_one_thread() -> None:
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)  # called, not entered: the limit holds for the life of the process

"""Leaving a gloo process group does not deadlock (``distributed.cleanup``).

Torch's gloo group joins its worker threads in its destructor while holding the GIL; a worker still
releasing a finished collective can need the GIL to free a tensor Python made, and then both wait
forever. The DDP test hung this way twice in about seven full suite runs. Here two processes go
through the loop's ending (DDP backward, an all-reduce of a Python tensor, a barrier, cleanup, the
model freed) 40 times in a row. Measured before the fix: the same ending in a plain script hung
within 20 rounds in 3 of 3 runs, and this test with cleanup as it was (destroy only) hung at 60
rounds; it is probabilistic, so a pass without the fix is possible, a hang with it is the bug.
"""

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

ROUNDS = 40
DEADLINE_S = 120


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, ports):
    from clip_backdoor.train import distributed as D

    torch.set_num_threads(1)
    for port in ports:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                          LOCAL_RANK=str(rank))
        env = D.init_distributed("cpu")
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
        model(torch.randn(2, 4)).sum().backward()
        D.all_reduce_mean(1.0, env, torch.device("cpu"))  # a tensor made in Python, freed by now
        D.barrier(env)
        D.cleanup(env)
        del model  # the destructor that joins the group's workers


def test_forty_process_groups_in_a_row_leave_without_a_deadlock():
    ports = [_free_port() for _ in range(ROUNDS)]
    context = mp.start_processes(_worker, args=(ports,), nprocs=2, join=False, start_method="spawn")
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not context.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail(f"{ROUNDS} process groups did not come and go within {DEADLINE_S} s: "
                            "leaving one deadlocked")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)

"""A check that every process has reached a collective before any enters it.

A collective that only some processes call (`if rank == 0: save_adapter(sharded_model, ...)`) waits in the engine
for the missing processes: for ever, or until the process group's timeout, and then with a message about an
all-gather the user never wrote. Meeting first in the process group's store, which every process reaches without a
collective, turns that into an error on the processes that came, naming the ones that did not and the fix.
"""

from __future__ import annotations

import datetime
import itertools
from collections import defaultdict

import torch.distributed as dist

ARRIVAL_TIMEOUT_S = 300.0
# per process and per collective: the n-th call of every process meets the n-th call of the others
_calls: defaultdict[str, itertools.count] = defaultdict(itertools.count)


def await_every_process(what: str, fix: str, timeout_s: float = ARRIVAL_TIMEOUT_S) -> None:
    """Record this process's arrival at the collective `what` and wait up to `timeout_s` seconds for every process's.

    Raises RuntimeError naming the processes that did not arrive and `fix`. Does nothing without a process group of
    several processes, or where torch offers no store to meet in.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    store = getattr(dist.distributed_c10d, "_get_default_store", lambda: None)()
    if store is None:
        return
    key = f"spu_peft/{what}/{next(_calls[what])}/"
    ranks = range(dist.get_world_size())
    store.set(key + str(dist.get_rank()), "1")
    try:
        store.wait([key + str(r) for r in ranks], datetime.timedelta(seconds=timeout_s))
    except RuntimeError as error:  # torch's DistStoreError on timeout
        missing = [r for r in ranks if not store.check([key + str(r)])]
        raise RuntimeError(
            f"`{what}` is a collective here, but process(es) {missing} of {len(ranks)} did not call it within "
            f"{timeout_s:g} s (this is process {dist.get_rank()}). {fix}"
        ) from error

"""A fake communicator for the metric-suite contract: ``all_reduce`` sums over threads, one per fake process."""

import threading
import types


class ThreadComm:
    """``all_reduce`` summing over ``world`` threads, each calling with its own rank's tensor, in the same order."""

    def __init__(self, world: int = 2):
        self.barrier = threading.Barrier(world)
        self.slots = [None] * world

    def rank(self, index: int):
        def all_reduce(tensor):
            self.slots[index] = tensor.clone()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0].clone())
            self.barrier.wait()
            return total

        return types.SimpleNamespace(all_reduce=all_reduce)


def run_ranks(work, world: int = 2, timeout: float = 60.0) -> list:
    """``[work(rank, comm) for each rank]``, the ranks running concurrently on threads sharing one ThreadComm."""
    hub, results, errors = ThreadComm(world), [None] * world, []

    def run(rank):
        try:
            results[rank] = work(rank, hub.rank(rank))
        except BaseException as error:  # noqa: BLE001 -- re-raised in the caller
            errors.append(error)
            hub.barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    if errors:
        raise errors[0]
    return results

"""Data parallelism: one run on several processes, launched by ``accelerate launch`` or ``torchrun``.

Every process runs the whole run and takes the same decisions; each loads its own copy of the model
(on its own GPU, or sharded over its own GPUs with ``device_map``). What is split is the engines'
work: a call's work units are the chunks one process would run, so every row is computed exactly as
on one process, and they are shared out by tokens and gathered back in order (``share_work``). Only
the main process reads and writes the run folder and the response cache; it shares what it reads
(``share``), so the others never need the folder (several machines need no shared disk).

The collectives are accelerate's (``broadcast_object_list``, ``gather_object``) over the process group
that accelerate's ``PartialState`` sets up: NCCL between GPUs, gloo between CPU processes.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import MetaspoError


class ProcessLost(MetaspoError):
    """Another process of the run died or cannot be reached: this one stops too."""

    exit_code = 3


@dataclass(frozen=True)
class Processes:
    """The processes of one run and this one's place among them."""

    count: int = 1
    index: int = 0
    # Processes on this machine, and this one's place among them (which GPUs are its own).
    local_count: int = 1
    local_index: int = 0

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @classmethod
    def launched(cls) -> Processes:
        """The processes the launcher started (``WORLD_SIZE`` > 1), joined into one group; else one."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return SINGLE
        # Not at the top: accelerate imports torch, which `metaspo --help` skips.
        import torch
        from accelerate import PartialState

        # cpu=True where there is no GPU: otherwise accelerate treats a CPU-only torchrun as one process.
        state = PartialState(cpu=not torch.cuda.is_available())
        # Closed before the interpreter tears down: a gloo group left open can abort the process at exit
        # (SIGABRT, "terminate called without an active exception") after the run itself succeeded.
        atexit.register(state.destroy_process_group)
        local_count = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
        return cls(state.num_processes, state.process_index, local_count, state.local_process_index)

    def share(self, value: Any) -> Any:
        """The main process's ``value``, on every process (the others pass anything, e.g. None)."""
        if self.count == 1:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        with self._collective("share"):
            broadcast_object_list(box, from_process=0)
        return box[0]

    def gather(self, value: Any) -> list:
        """Every process's ``value``, in process order, on every process."""
        if self.count == 1:
            return [value]
        from accelerate.utils import gather_object

        with self._collective("gather"):
            # gather_object flattens one level: each process contributes a list of one item.
            return gather_object([value])

    def assign(self, costs: list[float]) -> list[int]:
        """The units this process runs: the costliest first, each to the least loaded process (ties to the
        lower index). Every process computes the same assignment from the same costs."""
        loads = [0.0] * self.count
        owner = [0] * len(costs)
        for unit in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            process = min(range(self.count), key=lambda p: (loads[p], p))
            owner[unit] = process
            loads[process] += costs[unit]
        return [unit for unit in range(len(costs)) if owner[unit] == self.index]

    def share_work(self, units: list, cost: Callable[[Any], float], run: Callable[[Any], Any], stats=None) -> list:
        """``[run(unit) for unit in units]``, each unit run by one process and the results gathered in order.

        ``stats`` (an ``EngineStats`` that ``run`` adds to) ends up counting every process's work, as one
        process would have; its ``seconds`` stay this process's own."""
        if self.count == 1:
            return [run(unit) for unit in units]
        before = stats.as_dict() if stats is not None else {}
        local = {unit: run(units[unit]) for unit in self.assign([cost(u) for u in units])}
        spent = {name: value - before[name] for name, value in stats.as_dict().items()} if stats is not None else {}
        results: dict[int, Any] = {}
        for process, (part, counts) in enumerate(self.gather((local, spent))):
            results.update(part)
            if process != self.index:
                for name, value in counts.items():
                    if name != "seconds":
                        setattr(stats, name, getattr(stats, name) + value)
        return [results[unit] for unit in range(len(units))]

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (e.g. converting a model into the cache), then the others."""
        if not self.is_main:
            self.share(None)  # waits for the main process's share after its block
        yield
        if self.is_main:
            self.share(None)

    def gpus(self, device_count: int) -> list[int]:
        """This process's GPUs on its machine: an equal share, in order (``device_map`` shards over them)."""
        share = device_count // self.local_count
        if share == 0:
            raise MetaspoError(f"{self.local_count} processes on this machine but {device_count} GPUs",
                               hint="launch at most one process per GPU (--num_processes)")
        return list(range(self.local_index * share, (self.local_index + 1) * share))

    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except (RuntimeError, ConnectionError) as error:  # gloo/NCCL report a lost peer as RuntimeError
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ProcessLost(
                f"process {self.index} of {self.count} lost the others during {what}: {first}",
                hint="everything finished is in the run folder; run the same command again with --resume RUN_DIR "
                     "(on any number of processes)") from None


SINGLE = Processes()

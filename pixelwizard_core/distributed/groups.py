"""Groups of ranks that take prompts from one shared counter: ``torchrun`` with N = G x U processes and
``--ulysses_size U`` runs G groups of U ranks, each sampling its own prompt (sequence parallel and FSDP
inside the group), so a batch of P prompts runs G at a time.

- The groups are the consecutive U-rank slices of the world (ranks 0..U-1, U..2U-1, ...); a group may
  span machines. Every rank creates every group's process group, in the same order (``dist.new_group``
  is collective over the world).
- The counter is a key of torchrun's c10d store (``store.add``): a group's first rank, its leader, takes
  the next prompt index when it is free and broadcasts it inside its group, so fast groups take more.
- At the end every rank waits for the others on the store (polling, so a group that finishes hours early
  does not time out in a collective), then all meet in one barrier and leave together.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from ..errors import ConfigError, PixelWizardError

log = logging.getLogger("pixelwizard")

POLL_SECONDS = 0.2


def check_groups(world_size: int, ulysses: int, fsdp: bool) -> int:
    """The number of groups G of ``ulysses`` ranks in ``world_size`` processes, refused up front when the
    world does not divide, or when FSDP would shard over groups of one rank."""
    if isinstance(ulysses, bool) or not isinstance(ulysses, int) or ulysses < 1:
        raise ConfigError(f"--ulysses_size must be a positive integer, got {ulysses!r}")
    if world_size % ulysses:
        raise ConfigError(f"--ulysses_size {ulysses} does not divide the {world_size} processes: the processes form "
                          f"groups of {ulysses} ranks (one prompt per group at a time); launch a multiple of "
                          f"{ulysses} processes or choose a --ulysses_size that divides {world_size}")
    groups = world_size // ulysses
    if fsdp and ulysses == 1 and world_size > 1:
        raise ConfigError(f"--dit_fsdp/--t5_fsdp shard the models inside each group of --ulysses_size ranks; with "
                          f"--ulysses_size 1 each of the {world_size} processes is a group of one and nothing would "
                          f"be sharded: use --ulysses_size {world_size} (one group over every process) or a size "
                          "between")
    return groups


@dataclass
class RankGroup:
    """This rank's group: its index among ``count`` groups, its global ``ranks``, its process group (the
    Ulysses all-to-all, the FSDP mesh) and a gloo one for CPU objects (the same where gloo is the backend)."""

    index: int
    count: int
    ranks: list[int]
    group: dist.ProcessGroup
    cpu_group: dist.ProcessGroup

    @property
    def rank(self) -> int:
        """This process's rank inside the group (0: the leader, which alone writes files)."""
        return self.ranks.index(dist.get_rank())


def form_groups(ulysses: int) -> RankGroup:
    """Create the process group of every U-rank slice (collective: every rank, same order); this rank's."""
    world, rank = dist.get_world_size(), dist.get_rank()
    gloo = dist.get_backend() == "gloo"
    mine = None
    for index in range(world // ulysses):
        ranks = list(range(index * ulysses, (index + 1) * ulysses))
        group = dist.new_group(ranks)
        cpu_group = group if gloo else dist.new_group(ranks, backend="gloo")
        if rank in ranks:
            mine = RankGroup(index, world // ulysses, ranks, group, cpu_group)
    return mine


class SharedQueue:
    """The prompt counter of a run with several groups, in the c10d store torchrun set up (reached as a
    client at MASTER_ADDR:MASTER_PORT, keys under a prefix of this run and restart)."""

    def __init__(self, group: RankGroup, store: dist.Store | None = None) -> None:
        self.group = group.index  # for the manifest
        self.store = dist.PrefixStore(_prefix(), store if store is not None else _torchrun_store())
        self.world_cpu = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def take(self) -> int:
        """The next prompt index (0-based) of the whole run; past the last prompt once they are all taken."""
        return int(self.store.add("next", 1)) - 1

    def agree(self, value: object) -> object:
        """Global rank 0's ``value`` on every rank (collective over the world): e.g. a random base seed."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.world_cpu)
        return box[0]

    def finish(self, ok: bool) -> None:
        """Wait for every group to run out of prompts, then leave together. A rank that failed says so on the
        store (``ok`` False) and returns at once; the others then stop waiting with an error."""
        if not ok:
            self.store.add("failed", 1)
            return
        self.store.add("finished", 1)
        world = dist.get_world_size()
        while int(self.store.add("finished", 0)) < world:
            if int(self.store.add("failed", 0)):
                raise PixelWizardError("another group of processes failed (see its log); this group finished its "
                                       "prompts")
            time.sleep(POLL_SECONDS)
        dist.barrier(group=self.world_cpu)


def _prefix() -> str:
    """Keys of this run and attempt: a restarted torchrun job starts a fresh counter."""
    run = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return f"pixelwizard/batch/{run}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


def _torchrun_store() -> dist.Store:
    """A client of the store the process group was made with (torchrun's agent's, or rank 0's)."""
    try:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError):
        raise ConfigError("groups of ranks need torchrun's MASTER_ADDR and MASTER_PORT to share the prompt "
                          "counter; launch with torchrun") from None
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=300))


def describe(group: RankGroup) -> str:
    return f"group {group.index + 1} of {group.count} (ranks {group.ranks[0]}..{group.ranks[-1]})"


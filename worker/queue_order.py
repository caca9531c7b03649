"""The order in which a worker's BRPOP names its queues (kombu's `queue_order_strategy`).

Redis BRPOP pops from the first non-empty list it is given, so this order is the scheduling
policy (`routing.queue_rank`): priority first (high, normal, low); within a priority the tier of
the largest jobs this worker can render first and the shared tier last (a capable card serves the
big jobs the small ones cannot); within one priority and tier the lanes take turns, so concurrent
batches share the fleet: kombu calls `rotate(queue)` after each message it pops, which moves that
lane behind the other lanes of its group.
"""
from __future__ import annotations

from kombu.utils.scheduling import round_robin_cycle

from shared import profiles, routing
from worker import config


class ZfarmCycle(round_robin_cycle):
    """Priority and tier order between groups, round-robin between the lanes of a group."""

    def __init__(self, it=None):
        super().__init__(it)
        self._ceilings = routing.tier_ceilings(profiles.max_pixels_by_class(config.table()))
        self._ranks: dict[str, tuple[int, int]] = {}

    def _rank(self, queue: str) -> tuple[int, int]:
        rank = self._ranks.get(queue)
        if rank is None:
            rank = self._ranks[queue] = routing.queue_rank(queue, self._ceilings)
        return rank

    def consume(self, n):
        # sorted() is stable: within a group the lanes keep their rotated order.
        return sorted(self.items[:n], key=self._rank)

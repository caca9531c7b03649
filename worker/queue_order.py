"""The order in which a worker's BRPOP names its queues (kombu's `queue_order_strategy`).

Redis BRPOP pops from the first non-empty list it is given, so this order is the scheduling
policy: priority first (high, normal, low); within a priority the largest-job tier this worker can
render first and the shared tier last (a capable card serves the big jobs the small ones cannot);
within one priority and tier the lanes take turns, so concurrent batches share the fleet.
"""
from __future__ import annotations

from kombu.utils.scheduling import round_robin_cycle

from shared import keys
from shared.schema import PRIORITIES


def _tier_rank(tier: str) -> int:
    if tier == keys.SHARED_TIER:
        return 10**6
    if tier == "c0":
        return -1
    # "c24" before "c16": larger classes hold the larger jobs.
    return -int(tier[1:]) if tier[1:].isdigit() else 10**5


def _group(queue: str):
    parsed = keys.parse_queue(queue)
    if parsed is None:
        return (len(PRIORITIES), 10**7)
    priority, tier, _lane = parsed
    rank = PRIORITIES.index(priority) if priority in PRIORITIES else len(PRIORITIES)
    return (rank, _tier_rank(tier))


class ZfarmCycle(round_robin_cycle):
    """Priority and tier order between groups, round-robin between the lanes of a group."""

    def consume(self, n):
        position = {q: i for i, q in enumerate(self.items)}
        return sorted(self.items[:n], key=lambda q: (_group(q), position[q]))


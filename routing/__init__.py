"""Routing policy: pure functions from a fleet snapshot to a ranked list of instances.

No I/O here. The router reads a :class:`FleetSnapshot` from Redis, asks :func:`rank` for the
instances in order of preference, and reserves a slot on the first one that has a free slot
(atomically, in Redis). Everything in this package is testable without a broker.
"""

from routing.placement import Placement, plan
from routing.ranking import STRATEGIES, Choice, rank
from routing.snapshot import FleetSnapshot, InstanceStats

__all__ = [
    "STRATEGIES",
    "Choice",
    "FleetSnapshot",
    "InstanceStats",
    "Placement",
    "plan",
    "rank",
]

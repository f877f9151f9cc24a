"""Class caps (bulkheads): at most ``max_in_flight`` slots for the jobs of one agent class.

A capped class's count of held slots lives in one hash; a job of such a class records its
class when granted (``job_class``) or when it starts waiting (``waiter_class``, "class|cap"),
and gives the count back with its grant. The counting happens inside the slot scripts
(``lua/classes.lua`` is included into them), in the same atomic step as the slot; this class
reads the counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from app.state import keys


@dataclass(frozen=True)
class ClassCaps:
    redis: redis.Redis
    ns: str

    def in_flight(self, agent_class: str) -> int:
        """Slots the jobs of a capped class hold now."""
        return int(self.redis.hget(keys.class_in_flight(self.ns), agent_class) or 0)

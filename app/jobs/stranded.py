"""Jobs stranded on a dead instance's queue go back through the router.

A job on an instance queue already holds a slot there. If that instance's worker stops
heartbeating and does not come back, nobody would ever consume those messages. Every live
instance worker therefore looks, on its heartbeat, for instances silent for longer than
``STRANDED_AFTER`` heartbeats, takes the messages still waiting on their queues (never those a
worker is running: those are unacknowledged and out of reach), frees their slots, and
publishes them again to their model/tier queue under the same task id.
"""

from __future__ import annotations

import json
import logging

from app.celery_app import INFER_TASK, celery_app
from app.queues import broker_channel, instance_queue, route_queue
from app.settings import get_settings
from app.state.fleet import fleet_state

log = logging.getLogger(__name__)

#: An instance silent for this many heartbeat intervals has its waiting jobs moved away.
STRANDED_AFTER = 10


def rescue_stranded(me: str) -> int:
    """Move the waiting jobs of long-silent instances back to the router; returns how many."""
    fleet = fleet_state()
    snap = fleet.instances.snapshot()
    silent_for = STRANDED_AFTER * get_settings().heartbeat_interval
    dead = [i.name for i in snap.instances if i.name != me and i.expires_at + silent_for < snap.now]
    return sum(requeue(name) for name in dead)


def requeue(instance: str) -> int:
    """Move the jobs waiting on the instance's queue back to the router; returns how many."""
    from amqp.exceptions import NotFound

    moved = 0
    with celery_app.connection_for_write() as conn:
        channel = broker_channel(conn.default_channel)
        try:
            while msg := channel.basic_get(instance_queue(instance)):
                headers = msg.properties.get("application_headers") or {}
                _, kwargs, _ = json.loads(msg.body)
                job = headers["id"]
                fleet_state().slots.release([job])
                kwargs["_route"] = {**kwargs["_route"], "instance": None}
                # By name: the job path does not import the task that drives it.
                celery_app.send_task(
                    INFER_TASK,
                    kwargs=kwargs,
                    task_id=job,
                    kwargsrepr=headers.get("kwargsrepr"),
                    queue=route_queue(kwargs["model"], kwargs.get("tier", "normal")),
                    priority=kwargs.get("priority", 5),
                    ignore_result=True,
                )
                channel.basic_ack(msg.delivery_tag)
                moved += 1
        except NotFound:
            return 0
    if moved:
        log.warning("moved %d job(s) from instance %s back to the router", moved, instance)
    return moved

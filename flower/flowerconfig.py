"""Corral's Flower configuration: ``corral flower --conf=flower/flowerconfig.py``.

(``corral flower`` runs Flower with Corral's queues listed in its Broker tab from the start,
see ``app.ops.flower``.)

Basic auth comes from ``FLOWER_BASIC_AUTH=user:password`` (``corral up`` generates one and
prints it); Flower refuses to start its API without auth. Note that Flower serves
``/metrics`` and ``/healthcheck`` WITHOUT authentication: keep port 5555 on a private
network or behind a proxy that protects those paths.
"""

import os

address = os.environ.get("FLOWER_ADDRESS", "127.0.0.1")
port = int(os.environ.get("FLOWER_PORT", "5555"))
# Task history survives a Flower restart.
persistent = True
db = os.environ.get("FLOWER_DB", ".corral/flower.db")
state_save_interval = 10_000
# RabbitMQ's management API, so the Broker tab shows queue lengths per priority.
broker_api = os.environ.get("FLOWER_BROKER_API", "http://guest:guest@127.0.0.1:15672/api/")
max_tasks = 50_000
purge_offline_workers = 600
natural_time = False
# Job arguments are shown as the workers report them: Corral publishes every job with a
# shortened ``kwargsrepr`` (long prompts cut, no secrets), see tasks/infer.py.

"""The registry database and what changes it: the fleet's instances and the rate-limit policy
as they *should* be (SQLAlchemy, Alembic), the operations that change them and push the
change into Redis at once (``admin``, ``policy_admin``), and their CLIs (``corral fleet``,
``corral policy``). The gateway's admin API uses the same operations."""

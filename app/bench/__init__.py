"""Local stacks and what runs on them: ``corral up`` and its demo, the test harness, and
``corral bench``.

Nothing in the runtime imports this package."""

"""Who may run what, and when: rate limits, fairness inside a tier, degradation levels, and the
live policy that ``corral policy`` changes."""

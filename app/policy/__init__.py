"""Who may run what, and when, as every process applies it: rate limits, fairness inside a
tier, degradation levels, and the live policy in force (Redis). What the policy *should* be is
kept in the registry database (``app.fleet.policy_store``)."""

"""The fleet-state layer: every Redis key Corral uses, and the Lua that keeps them consistent."""

"""The fleet: its registry (desired configuration), the changes made to it, ``corral fleet``."""

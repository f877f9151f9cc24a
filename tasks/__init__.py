"""Corral's tasks. ``from tasks import infer`` is all an agent needs."""

from tasks.infer import infer

__all__ = ["infer"]

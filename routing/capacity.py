"""What a server can hold at once: the one fit rule the plan and the workers share.

Ollama loads a model only while the loaded ones number fewer than ``OLLAMA_MAX_LOADED_MODELS``
and its size fits in the memory they leave (reference: server/sched.go); otherwise it evicts.
A plan or a move that counted models only put a big model beside two small ones on a box
that holds one or the other, and Ollama evicted one for each job of the other.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

#: Bytes in a GiB: ``memory_gb`` is in GiB, as Ollama reports memory in its logs and errors.
GIB = 1024**3


def fits(
    models: Collection[str],
    max_loaded: int,
    memory: float | None,
    size_of: Mapping[str, float],
) -> bool:
    """Whether a server holds ``models`` at once: no more than ``max_loaded`` of them and,
    when ``memory`` (bytes) is set, their sizes (``size_of``, bytes) sum to no more than it.
    A size nobody reported counts 0: the count alone then decides, as without a budget."""
    if len(models) > max_loaded:
        return False
    return memory is None or sum(size_of.get(m, 0.0) for m in models) <= memory

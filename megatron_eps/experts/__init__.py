"""Load-aware expert compute: backends behind one interface, a selector over them, and the
runner a layer's pipeline calls per chunk (``chunk_runner``)."""

from megatron_eps.experts.base import (
    ExpertBackend,
    LocalExperts,
    available_backends,
    get_backend,
    register_backend,
    registered_backends,
)

__all__ = [
    "ExpertBackend",
    "LocalExperts",
    "available_backends",
    "get_backend",
    "register_backend",
    "registered_backends",
]

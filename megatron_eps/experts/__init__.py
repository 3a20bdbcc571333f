"""Load-aware expert compute: backends behind one interface, and a selector over them."""

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

"""
The known backends, by name (C{--backend NAME}): what start-up
(L{txgraph.tap}, L{txgraph.statedir}) uses to find a backend's class.  The
contract (L{txgraph.backends}) does not import its implementations; this
module does, each only when it is asked for.
"""

from __future__ import annotations

from txgraph.backends import Backend, BackendContract
from txgraph.errors import ConfigurationError

BACKEND_NAMES = ("overlay", "rbd")


def backend_class(name: str) -> type[Backend]:
    """
    The backend called C{name}; a L{ConfigurationError} listing the known
    ones otherwise.  Backends are imported only when asked for, so that a
    missing optional dependency (Ceph's bindings) affects only its backend.
    """
    if name == "overlay":
        from txgraph.backends.overlay import OverlayBackend

        overlay: type[BackendContract] = OverlayBackend  # mypy checks the contract
        del overlay
        return OverlayBackend
    if name == "rbd":
        try:
            from txgraph.backends.rbd import RBDBackend
        except ImportError as e:
            raise ConfigurationError(f"the rbd backend is not available: {e}") from None
        rbd: type[BackendContract] = RBDBackend  # mypy checks the contract
        del rbd
        return RBDBackend
    raise ConfigurationError(f"unknown backend {name!r} (known: {', '.join(BACKEND_NAMES)})")

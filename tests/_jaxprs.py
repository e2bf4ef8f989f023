"""Walking a traced program: the equations of a jaxpr and of every jaxpr nested in its
equations' parameters (jit, scan, a Pallas kernel's body)."""
from __future__ import annotations

from collections.abc import Iterator


def equations(jaxpr) -> Iterator:
    """Every equation in `jaxpr` and the jaxprs inside it, depth first."""
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                    yield from equations(getattr(sub, "jaxpr", sub))


def dot_generals(jaxpr) -> Iterator:
    """Every dot_general equation in `jaxpr` and the jaxprs inside it."""
    return (eqn for eqn in equations(jaxpr) if eqn.primitive.name == "dot_general")


def pallas_calls(jaxpr) -> list[str]:
    """The names of the Pallas kernels `jaxpr` (and the jaxprs inside it) calls, one per call."""
    return [eqn.params["name"] for eqn in equations(jaxpr) if eqn.primitive.name == "pallas_call"]

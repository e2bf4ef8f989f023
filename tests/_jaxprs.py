"""Walking a traced program: the equations of a jaxpr and of every jaxpr nested in its
equations' parameters (jit, scan, a Pallas kernel's body)."""
from __future__ import annotations

from collections.abc import Iterator


def dot_generals(jaxpr) -> Iterator:
    """Every dot_general equation in `jaxpr` and the jaxprs inside it."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                    yield from dot_generals(getattr(sub, "jaxpr", sub))

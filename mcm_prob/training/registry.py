"""The built-in objectives by name: the labels that studies, TOML files and reports use."""

from __future__ import annotations

from collections.abc import Mapping

import equinox as eqx

from .consistency import CD, CT
from .continuous import ContinuousConsistency
from .flow_map_matching import FlowMapMatching
from .meanflow import MeanFlow
from .objective import AbstractObjective
from .shortcut import Shortcut

__all__ = ["OBJECTIVES", "objective_from_spec", "objective_label"]

# label -> (objective class, its arguments): distillation (exact score) and training (pair)
OBJECTIVES = {
    "cd-euler": (CD, {"teacher": "euler"}),
    "cd-heun": (CD, {"teacher": "heun"}),
    "cd-exact": (CD, {"teacher": "exact"}),
    "ct": (CT, {}),
    "scd": (ContinuousConsistency, {"velocity": "exact"}),
    "sct": (ContinuousConsistency, {"velocity": "pair"}),
    "meanflow": (MeanFlow, {"velocity": "pair"}),
    "meanflow-distill": (MeanFlow, {"velocity": "exact"}),
    "shortcut": (Shortcut, {"velocity": "pair"}),
    "shortcut-distill": (Shortcut, {"velocity": "exact"}),
    "fmm-lagrangian": (FlowMapMatching, {"kind": "lagrangian", "velocity": "exact"}),
    "fmm-eulerian": (FlowMapMatching, {"kind": "eulerian", "velocity": "exact"}),
    "fmm-progressive": (FlowMapMatching, {"kind": "progressive", "velocity": "exact"}),
    "lsd": (FlowMapMatching, {"kind": "lagrangian", "velocity": "pair"}),
    "esd": (FlowMapMatching, {"kind": "eulerian", "velocity": "pair"}),
    "psd": (FlowMapMatching, {"kind": "progressive", "velocity": "pair"}),
}


def objective_from_spec(spec) -> tuple[str, AbstractObjective]:
    """(label, objective) from a label of `OBJECTIVES` (``"meanflow"``), a table with the key
    ``objective`` (a label), optional ``label`` and the objective's own arguments
    (``{"objective": "sct", "warmup": 500, "label": "sct-warm"}``), or an objective object
    (labelled by `objective_label`)."""
    if isinstance(spec, AbstractObjective):
        return objective_label(spec), spec
    if isinstance(spec, str):
        spec = {"objective": spec}
    if not isinstance(spec, Mapping) or spec.get("objective") not in OBJECTIVES:
        raise ValueError(
            f"an objective is one of {sorted(OBJECTIVES)} or a table with `objective` = one of "
            f"them and its arguments, got {spec!r}"
        )
    spec = dict(spec)
    name = spec.pop("objective")
    label = spec.pop("label", None)
    kind, base = OBJECTIVES[name]
    try:
        obj = kind(**(base | spec))
    except TypeError as err:
        raise ValueError(f"objective {name!r}: {err}") from None
    return (label or (name if not spec else objective_label(obj))), obj


def objective_label(objective: AbstractObjective) -> str:
    """The `OBJECTIVES` label of an objective with its default arguments, else its repr."""
    for name, (kind, base) in OBJECTIVES.items():
        if type(objective) is kind and eqx.tree_equal(objective, kind(**base)) is True:
            return name
    return repr(objective)

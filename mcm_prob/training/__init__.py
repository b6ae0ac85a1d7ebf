"""Objectives and the training loop: every way of learning f(x, t, s) = Phi_{t->s}(x).

* `objective`: the public interface (`AbstractObjective`, `Context`) and shared pieces;
* `consistency`: `CD` (Euler, Heun, exact teacher) and `CT`/iCT on a Delta grid, `teacher_map`;
* `continuous`: `ContinuousConsistency` (sCM); `meanflow`: `MeanFlow`; `shortcut`: `Shortcut`;
  `flow_map_matching`: `FlowMapMatching` (Lagrangian, Eulerian, progressive);
* `config`: `FitConfig` (loop), `NetworkConfig`, `OptimizerConfig`, and `TrainConfig`, the flat
  route to CD and CT;
* `loop`: `fit`, `fit_grid` (any objective), `FittedGrid`, `TrainedModel`.

`OBJECTIVES` names the built-in objectives (the labels studies and TOML files use).
"""

from .config import FitConfig, NetworkConfig, OptimizerConfig, TrainConfig
from .consistency import CD, CT, grid_batch, grid_indices, teacher_map
from .continuous import ContinuousConsistency, TimeWeight
from .flow_map_matching import FlowMapMatching
from .loop import (
    FittedGrid,
    TrainedModel,
    TrainingDiverged,
    TrainState,
    fit,
    fit_grid,
    time_indices,
    training_batch,
    training_set,
)
from .meanflow import MeanFlow
from .objective import AbstractObjective, Context
from .registry import OBJECTIVES, objective_from_spec, objective_label
from .shortcut import Shortcut

__all__ = [
    "AbstractObjective",
    "Context",
    "CD",
    "CT",
    "ContinuousConsistency",
    "TimeWeight",
    "MeanFlow",
    "Shortcut",
    "FlowMapMatching",
    "OBJECTIVES",
    "objective_from_spec",
    "objective_label",
    "FitConfig",
    "NetworkConfig",
    "OptimizerConfig",
    "TrainConfig",
    "TrainState",
    "fit",
    "fit_grid",
    "FittedGrid",
    "TrainedModel",
    "TrainingDiverged",
    "teacher_map",
    "training_set",
    "training_batch",
    "time_indices",
    "grid_batch",
    "grid_indices",
]

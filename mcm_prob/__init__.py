"""mcm_prob: multi-step consistency models with exact ground truth.

Pipeline: Gaussian paths (`mcm_prob.paths`; default `OU`) -> data (`mcm_prob.data`) -> forward process (`joint_model`) -> exact flow maps
(`flow_map`, `ExactFlow`) -> objectives and training (`mcm_prob.training`: `CD`, `CT`, `ContinuousConsistency`, `MeanFlow`, `Shortcut`,
`FlowMapMatching`, your own `AbstractObjective`; `fit`, `fit_grid`; `save_model`, `load_model`) -> sampling on any schedule (`sample`, `Schedule`, `optimal_schedule`) -> metrics
-> statistics (`bootstrap_rates`, `fit_error_model`, `compare_error_models`) -> studies (`mcm_prob.studies`: run on your own data, one driver, netCDF results).
"""

from . import (
    accuracy,
    cache,
    data,
    densities,
    devices,
    diffusion,
    error_models,
    gridlaw,
    laws,
    metrics,
    optimal,
    paths,
    schedules,
    statistics,
    studies,
    training,
)
from .flow import AbstractFlowMap, ExactFlow, flow_map, pf_flow, pf_ode_step, pf_ode_velocity
from .forward import OU, OrnsteinUhlenbeck, alpha, joint_model, sigma
from .metrics import consistency_error
from .networks import ConsistencyNet, DisplacementNet
from .optimal import OptimalSchedule, optimal_schedule
from .sampling import (
    SamplerOutput,
    affine_error,
    sample,
    sample_deterministic,
    sample_gamma,
    sample_grid,
    sample_song,
    sampler_law,
    sampler_times,
)
from .saving import load_model, save_model
from .schedules import Schedule
from .statistics import bootstrap_rates, compare_error_models, fit_error_model, fit_error_models
from .training import (
    CD,
    CT,
    AbstractObjective,
    ContinuousConsistency,
    FitConfig,
    FittedGrid,
    FlowMapMatching,
    MeanFlow,
    NetworkConfig,
    OptimizerConfig,
    Shortcut,
    TrainConfig,
    TrainedModel,
    TrainingDiverged,
    fit,
    fit_grid,
    training_set,
)

__version__ = "0.1.0"

__all__ = [
    "OU",
    "OrnsteinUhlenbeck",
    "paths",
    "laws",
    "alpha",
    "sigma",
    "joint_model",
    "data",
    "densities",
    "flow_map",
    "pf_flow",
    "pf_ode_velocity",
    "pf_ode_step",
    "ExactFlow",
    "ConsistencyNet",
    "DisplacementNet",
    "AbstractFlowMap",
    "AbstractObjective",
    "CD",
    "CT",
    "ContinuousConsistency",
    "MeanFlow",
    "Shortcut",
    "FlowMapMatching",
    "FitConfig",
    "NetworkConfig",
    "OptimizerConfig",
    "training",
    "TrainConfig",
    "TrainingDiverged",
    "fit",
    "fit_grid",
    "FittedGrid",
    "training_set",
    "TrainedModel",
    "save_model",
    "load_model",
    "metrics",
    "consistency_error",
    "sample",
    "sample_grid",
    "sample_deterministic",
    "sample_song",
    "sample_gamma",
    "sampler_times",
    "Schedule",
    "schedules",
    "optimal",
    "optimal_schedule",
    "OptimalSchedule",
    "sampler_law",
    "affine_error",
    "SamplerOutput",
    "diffusion",
    "gridlaw",
    "accuracy",
    "statistics",
    "error_models",
    "bootstrap_rates",
    "fit_error_model",
    "fit_error_models",
    "compare_error_models",
    "studies",
    "cache",
    "devices",
]

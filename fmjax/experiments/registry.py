"""The experiments by name, as ``fmjax experiment NAME`` and ``fmjax demo`` find them."""

from fmjax.experiments.cfm_equals_fm import CFMConfig, cfm_equals_fm
from fmjax.experiments.couplings import CouplingsConfig, couplings_experiment
from fmjax.experiments.demo import DemoConfig, demo
from fmjax.experiments.digits import DigitsConfig, digits
from fmjax.experiments.flows_and_scores import FlowsScoresConfig, flows_and_scores
from fmjax.experiments.gmm_to_gmm import GMMConfig, gmm_to_gmm
from fmjax.experiments.ot_vs_vp import OTvsVPConfig, ot_vs_vp
from fmjax.experiments.stochastic_interpolants import SIConfig, stochastic_interpolants

#: Experiment name -> function.
EXPERIMENTS = {
    "demo": demo,
    "gmm_to_gmm": gmm_to_gmm,
    "ot_vs_vp": ot_vs_vp,
    "flows_and_scores": flows_and_scores,
    "cfm_equals_fm": cfm_equals_fm,
    "stochastic_interpolants": stochastic_interpolants,
    "couplings": couplings_experiment,
    "digits": digits,
}

#: Experiment name -> config class.
CONFIGS = {
    "demo": DemoConfig,
    "gmm_to_gmm": GMMConfig,
    "ot_vs_vp": OTvsVPConfig,
    "flows_and_scores": FlowsScoresConfig,
    "cfm_equals_fm": CFMConfig,
    "stochastic_interpolants": SIConfig,
    "couplings": CouplingsConfig,
    "digits": DigitsConfig,
}

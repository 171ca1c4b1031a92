"""Composition shared by the experiment configs: the schema and the paper's methods as edits.

The schema (every field, its default and its comment) lives in the package:
`smatch_jax/config.py` assembles the typed sections of the modules that use them, and model
architectures are named presets of `smatch_jax/models/config.py` (`PRESETS`). This file only
composes: `base_config()` is the package's, `apply_loss_variant` turns a method's name into
config edits. `smatch_jax.main` resolves the config, applies command-line overrides and
writes the result to `<workdir>/config.json`.
"""

from __future__ import annotations

import ml_collections

from smatch_jax.config import base_config

__all__ = ["LOSS_VARIANTS", "apply_loss_variant", "base_config"]

LOSS_VARIANTS = ("mle", "mle_ul", "bc", "sm_chi2", "sm_random", "sm_kl", "sm_nobkspc")


def apply_loss_variant(c: ml_collections.ConfigDict, variant: str) -> None:
    """The paper's methods as config edits."""
    if variant == "mle":  # maximum likelihood: BC on clean data
        c.loss.sm_weight, c.noise.rate = 0.0, 0.0
    elif variant == "mle_ul":  # MLE + token-level unlikelihood (Welleck et al., alpha = 1)
        c.loss.sm_weight, c.noise.rate, c.loss.unlikelihood_weight = 0.0, 0.0, 1.0
    elif variant == "bc":  # MLE + <bkspc>: BC on noise-augmented data
        c.loss.sm_weight = 0.0
    elif variant == "sm_chi2":
        c.loss.divergence, c.noise.kind = "chi2_mix", "ground_truth"
    elif variant == "sm_random":
        c.loss.divergence, c.noise.kind = "chi2_mix", "random"
    elif variant == "sm_kl":
        c.loss.divergence = "kl"
    elif variant == "sm_nobkspc":  # SequenceMatch without backspace
        c.noise.rate, c.sampling.allow_bkspc = 0.0, False

"""Trained dictionaries in one place: loading and checking SAEs (`load`), SAELens pretrained
SAEs (`pretrained`), and the two-model crosscoder (`crosscoder`).

Every stage that uses a trained dictionary goes through `load_sae`, so a checkpoint is read,
located and validated the same way everywhere. Training lives in `saediff.train`.
"""
from saediff.sae.crosscoder import Crosscoder, CrosscoderCfg, latent_scaling
from saediff.sae.load import (
                              SAE_KINDS,
                              check_sae,
                              check_sae_shapes,
                              check_sae_weights,
                              decoder_directions,
                              load_sae,
                              require_activation_sae,
                              resolve_layer,
                              sae_architecture,
                              sae_input_kind,
                              sae_layer,
)

__all__ = ["SAE_KINDS", "Crosscoder", "CrosscoderCfg", "check_sae", "check_sae_shapes",
           "check_sae_weights", "decoder_directions", "latent_scaling", "load_sae",
           "require_activation_sae", "resolve_layer", "sae_architecture", "sae_input_kind",
           "sae_layer"]

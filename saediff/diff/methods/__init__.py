"""Model-diffing methods behind one interface (diffing-toolkit style: one module per method).

Each method reads what a `MethodInputs` offers (paired cache rows, trained dictionaries,
an adapter, labelled residuals) and returns ranked `Candidate` directions in the residual
stream of one layer. `METHODS` maps a method name to its class; `LENSES` the token lenses
(methods whose `tokens` say where the models differ). See docs/adding_a_method.md.
"""
from __future__ import annotations

from saediff.diff.methods.base import Candidate, Method, MethodInputs, paired_rows
from saediff.diff.methods.crosscoder_latents import CrosscoderMethod
from saediff.diff.methods.diff_sae import DiffSAEMethod
from saediff.diff.methods.lenses import LENSES, DiffNormLens, KLLens
from saediff.diff.methods.lora_b import LoraBMethod
from saediff.diff.methods.mean_diff import MeanDiffMethod
from saediff.diff.methods.pca import PCAMethod, pca_directions
from saediff.diff.methods.sae_shift import SAEShiftMethod

METHODS: dict[str, type[Method]] = {m.name: m for m in (
    SAEShiftMethod, CrosscoderMethod, DiffSAEMethod, PCAMethod, MeanDiffMethod, LoraBMethod)}

__all__ = ["Candidate", "DiffNormLens", "KLLens", "LENSES", "Method", "MethodInputs", "METHODS",
           "paired_rows", "pca_directions"]

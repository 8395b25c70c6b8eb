"""Stage 6 — experiments: the field's EM experiments (training-time and in-context) as commands
(`saediff experiment NAME`).

The last stage: an experiment may import every stage; nothing imports an experiment. Each is a
module with a config dataclass and a `run_*` function returning the result dict; each writes
`OUT/result.json` (config, seeds, per-condition metrics with CIs) and `OUT/plot.html`
(`saediff.experiments.common`).
"""

# CLI name -> (module under saediff.experiments, config class, run function)
EXPERIMENTS = {
    "data-fraction": ("data_fraction", "DataFractionConfig", "run_data_fraction"),
    "block-em": ("block_em", "BlockEMConfig", "run_block_em"),
    "narrow-vs-general": ("narrow_general", "NarrowGeneralConfig", "run_narrow_general"),
    "intent": ("intent", "IntentConfig", "run_intent"),
    "icl": ("icl", "ICLConfig", "run_icl"),
}

"""tam_hf inside the tools people already fine-tune with, and the trackers its telemetry reaches.

* :mod:`tam_hf.integrations.axolotl`: ``plugins: [tam_hf.integrations.axolotl.TAMPlugin]`` in an axolotl config;
* :mod:`tam_hf.integrations.llamafactory`: LLaMA-Factory's v1 ``OptimizerPlugin`` registrations (the v0 trainer
  goes through ``python -m tam_hf.run llamafactory-cli train``);
* :mod:`tam_hf.integrations.torchtune`: damping statistics through torchtune's metric logger;
* :mod:`tam_hf.integrations.trackers`: which ``report_to`` trackers are installed (recipe validation).

Each module imports its tool only inside the functions that need it, so importing one costs nothing and a
missing tool fails only where it is used. This layer sits above :mod:`tam_hf.trainer` and :mod:`tam_hf.optim`
and below the recipe toolkit (:mod:`tam_hf.finetune`), which it never imports.
"""

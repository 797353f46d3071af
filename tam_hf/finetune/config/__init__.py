"""The recipe: schema, reading and overrides, messages, resolution and checks. A leaf of ``tam_hf.finetune``:
it imports nothing of it but :mod:`tam_hf.finetune.errors`, and no transformers or torch when it loads a recipe.
Import each name from the module that defines it (``tam_hf.finetune.config.load.load_recipe``)."""

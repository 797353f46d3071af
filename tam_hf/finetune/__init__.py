"""Recipe → run: the recipe schema, data, model (+LoRA/QLoRA), metrics, Hub push, launch and the run itself."""

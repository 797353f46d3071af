"""The multi-seed optimizer study (``tam-finetune compare``) and its report."""

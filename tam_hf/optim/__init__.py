"""The optimizers: TAM, AdaTAM, AdaTAMW (arXiv:2412.18790)."""

from tam_hf.optim.tam import TAM, AdaTAM, AdaTAMW, adatam, tam

__all__ = ["TAM", "AdaTAM", "AdaTAMW", "tam", "adatam"]

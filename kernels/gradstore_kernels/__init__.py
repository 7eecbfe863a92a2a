"""Fused sparse-row gradient ascent and influence scoring (Triton, with a torch reference)."""

"""Tiny ada: the domain classifier and routing policy in front of the specialists (pure PyTorch)."""

"""Fusion: the cross-attention merger and the T5 synthesizer that writes one answer from several."""

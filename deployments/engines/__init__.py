"""Specialist backends behind one protocol: Hugging Face transformers and vLLM."""

"""Building models (the tiny zoo, the embedded SmolLM2 conversion) and training LoRA adapters: not Serve code."""

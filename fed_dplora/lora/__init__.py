"""LoRA model factory and the adapter tensors that travel."""

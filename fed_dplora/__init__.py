"""fed-dplora: federated, differentially private LoRA fine-tuning (library core, no Flower)."""

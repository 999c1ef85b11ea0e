"""Flower server side of fed-dplora: LoRA FedAvg and the ServerApp."""

"""Flower ClientApp of fed-dplora."""

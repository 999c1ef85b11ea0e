"""Data sources (generated demo, local files, hub), partitioning and tokenization."""

"""A run's folder and its write-ahead checkpoint."""

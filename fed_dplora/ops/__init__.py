"""Operations: background imports at start-up, trial certificates for a deployment."""

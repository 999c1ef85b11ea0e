"""Operations: background imports at start-up, trial certificates for a deployment, freed
memory handed back to the OS."""

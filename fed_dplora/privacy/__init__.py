"""Privacy accounting over dp-accounting events. No torch here."""

"""The project's ServerApp (`server.server_app:app`): census, privacy plan, rounds through
the strategies of `strategies/`, ledger, failure policy, write-ahead checkpoints,
resume (`server.resume`) and reports (`server.reporting`)."""

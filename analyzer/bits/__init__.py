"""The BITS layer: protocol facts, packets, the session state machine, anomalies, extraction."""

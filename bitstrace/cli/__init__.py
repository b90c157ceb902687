"""The three command lines, `bits-analyze`, `bits-replay` and `bits-server`, and what they share
(`common`: exit statuses, output that went away, argument types)."""

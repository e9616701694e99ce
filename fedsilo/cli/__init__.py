"""The ``fedsilo`` command for every role: CA, coordinator, agent, demo, bench, audit (the top layer)."""

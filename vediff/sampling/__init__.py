"""The sampling core: σ schedules, solver functions over them, and the registry naming each sampler once."""

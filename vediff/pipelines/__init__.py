"""diffusers-style API over the sampling core: schedulers, pipelines, SamplerConfig, and denoisers on disk."""

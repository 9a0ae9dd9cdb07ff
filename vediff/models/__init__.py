"""The denoiser: the contract every sampler relies on, the network, its preconditioning and guidance."""

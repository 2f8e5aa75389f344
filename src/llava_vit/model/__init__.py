"""The packed encoder: configuration, modeling, attention backends, RoPE, positions, kernels, variants."""

"""Pure-PyTorch reference implementations: these define what is correct for every fused kernel."""

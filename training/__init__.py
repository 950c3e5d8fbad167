"""Offline training: data sources, the VAE models, the training loop, and the TorchScript export."""

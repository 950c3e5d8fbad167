"""The inference service: loads one TorchScript VAE artifact and serves it over HTTP.

It never imports `training`: everything model-specific travels inside the artifact."""

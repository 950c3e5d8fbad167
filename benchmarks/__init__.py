"""Benchmarks of the training code; run each as a module from the repository root, e.g.
`python -m benchmarks.train_vs_seed`."""

"""Running the pack outside ComfyUI's own start-up: a real ComfyUI started in this process (host.py), random-weight
models of the real architectures (random_models.py) and random-weight model files with the real shapes
(smoke_checkpoints.py) for the tests, the benchmarks, the training scripts' dry runs and the runner's ``--smoke``."""

"""Host-agnostic PyTorch math for the pack's mechanisms. Nothing in this package imports ComfyUI."""

"""The headless runner: a UI-format workflow run through ComfyUI's own execution engine (run.py)."""

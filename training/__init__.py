"""Training scripts for the pack's trainable parts (standalone: ``python -m training.<script>`` or ``accelerate
launch -m training.<script>`` from the repository root). See training/README section in the project README."""

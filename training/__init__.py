"""Training scripts for the pack's trainable parts (standalone: ``python -m faithful_inpaint.training.<script>`` or ``accelerate
launch -m faithful_inpaint.training.<script>`` from the repository root). See training/README section in the project README."""

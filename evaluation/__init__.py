"""Evaluation harness: datasets -> variants (workflows, settings, toy mechanisms) -> per-case results -> metrics
-> paired report. ``python -m faithful_inpaint.evaluation --help``; docs/evaluation.md.

Layering: above ``headless/`` (it runs workflows through the runner's executor) and ``kernels/``; nothing in the
pack's nodes imports it.
"""

"""Runnable examples of anyservice (the demo: ``python3 dev.py demo``)."""

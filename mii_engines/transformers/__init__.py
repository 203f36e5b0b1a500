"""The ``transformers`` engine plugin."""

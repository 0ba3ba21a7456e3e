"""Evaluation helpers (synthetic long-context tasks such as needle-in-a-haystack)."""

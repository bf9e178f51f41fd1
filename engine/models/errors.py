"""Errors of the model layer, kept apart so every models module can raise them without cycles."""
from __future__ import annotations


class ModelError(ValueError):
    """A base model cannot be used; the message names the path or URI (never credentials)."""

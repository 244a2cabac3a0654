"""Fixtures of the end-to-end tests; the helpers they use live in e2e_stack.py."""

from e2e_stack import client, model_id, reference_llm, stack

__all__ = ["client", "model_id", "reference_llm", "stack"]   # pytest fixtures

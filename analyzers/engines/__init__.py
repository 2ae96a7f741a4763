"""Engines: the in-process run pipeline and batched inference."""

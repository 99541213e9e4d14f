"""Typed config schemas of the stages (dataclasses validated by pipeline.config)."""

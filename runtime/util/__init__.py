"""Utilities beyond the core API (placement groups and metrics come in later releases)."""

"""Notebook widgets for Shoal."""

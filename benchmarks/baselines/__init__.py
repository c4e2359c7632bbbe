"""Servers the pool is measured against."""

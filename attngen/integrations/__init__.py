"""Adapters that plug attngen kernels into frameworks (import the one you use)."""

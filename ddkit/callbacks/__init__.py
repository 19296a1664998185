"""Callbacks: what hooks into training without being the model (hooks registered at fit start, removed at fit end)."""

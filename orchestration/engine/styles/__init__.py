"""The transaction styles, one module each, registered by name in `orchestration.engine.style`."""

"""Small shared utilities (MAC counting, peak memory, ...)."""

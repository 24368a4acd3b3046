"""Small shared utilities (MAC counting, peak memory, ...)."""
from .flops import count_macs

__all__ = ["count_macs"]

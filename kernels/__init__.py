"""Attention kernels with log-sum-exp and their merge (installed as ``apb.kernels``).

Pure tensor functions: nothing here knows about processes or models.
"""

from apb.kernels.attention import (attention, available_backends, force_backend, register_backend,
                                   repeat_kv, select_backend, windows_natively)
from apb.kernels.merge import merge, merge_, merge_many

__all__ = ["attention", "available_backends", "force_backend", "merge", "merge_", "merge_many", "register_backend",
           "repeat_kv", "select_backend", "windows_natively"]

"""Test material: the real SmolLM2-135M-Instruct GGUF (the package's default model), cached.

Usage: `python tools/smollm2.py` prints the cached path, downloading it on first use.
"""

from __future__ import annotations

from vkpack.runtime.cli.default_model import ModelUnavailable, cache_root, default_archive, smollm2_gguf

__all__ = ["ModelUnavailable", "cache_root", "default_archive", "smollm2_gguf"]

if __name__ == "__main__":
    print(smollm2_gguf())

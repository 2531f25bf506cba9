"""vkpack: run LLMs larger than the GPU's memory, from an offline-compiled pack archive."""

__version__ = "0.1.0"

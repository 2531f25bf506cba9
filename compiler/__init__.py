"""The offline compiler: model files (GGUF, safetensors, HF folders) to one `.vkpack` archive (entry point: build.py)."""

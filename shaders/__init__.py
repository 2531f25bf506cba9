"""GLSL compute shaders and their SPIR-V, shipped in the package (variants.py: the variant table)."""

"""The numpy backend: the numeric reference for every other backend."""

"""One small hierarchy for everything that comes from outside: models, archives, requests."""

from __future__ import annotations


class VkpackError(Exception):
    """Base of every error vkpack raises on purpose; the CLI prints it as one line."""


class FormatError(VkpackError):
    """A `.vkpack` archive is malformed: the message names the field and the bad value."""


class SourceError(VkpackError):
    """A model file (GGUF, safetensors, HF folder) is malformed or incomplete."""


class ArchNotSupported(VkpackError):
    """The model's architecture has no family file in the compiler."""


class ChecksumError(FormatError):
    """A pack's bytes do not match the checksum stored in the index."""

    def __init__(self, pack_id: int, message: str):
        super().__init__(message)
        self.pack_id = pack_id

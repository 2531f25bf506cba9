"""The `.vkpack` format and nothing else: constants, records, reader, writer, validation (spec: docs/FORMAT.md)."""

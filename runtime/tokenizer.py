"""The archive's tokenizer: text to ids and back, with the model's BOS and EOS ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..pack_format.errors import VkpackError


class ArchiveTokenizer:
    """The `tokenizers` tokenizer the archive carries (`raw`), plus its special ids."""

    def __init__(self, tok: dict[str, Any]):
        from tokenizers import Tokenizer

        try:
            self.raw = Tokenizer.from_str(tok["json"])
        except Exception as e:  # the tokenizers library raises plain Exceptions for bad JSON
            raise VkpackError(f"the archive's tokenizer does not load: {e}") from None
        self.eos_ids: set[int] = set(tok.get("eos_ids") or ([tok["eos_id"]] if tok.get("eos_id") is not None else []))
        self.bos_id: int | None = tok.get("bos_id")
        self.add_bos = bool(tok.get("add_bos"))

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.raw.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.raw.decode(list(ids), skip_special_tokens=skip_special_tokens)

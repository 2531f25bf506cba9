"""The archive's tokenizer: text to ids and back, with the model's BOS and EOS ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..pack_format.errors import VkpackError


class ArchiveTokenizer:
    """The `tokenizers` tokenizer the archive carries (`raw`), plus its special ids.

    The special ids come from an untrusted index (any id up to 2^62 passes the format's rule 12),
    and the tokenizers library raises OverflowError for ids of 2^32 and more: every id must name a
    token of the tokenizer, checked here once, so none reaches the library or the embedding.
    """

    def __init__(self, tok: dict[str, Any]):
        from tokenizers import Tokenizer

        try:
            self.raw = Tokenizer.from_str(tok["json"])
        except Exception as e:  # the tokenizers library raises plain Exceptions for bad JSON
            raise VkpackError(f"the archive's tokenizer does not load: {str(e)[:200]}") from None
        self.size = self.raw.get_vocab_size(with_added_tokens=True)
        eos = tok.get("eos_ids") or ([tok["eos_id"]] if tok.get("eos_id") is not None else [])
        self.eos_ids: set[int] = {self._own_id(i, "eos_ids") for i in eos}
        self.bos_id: int | None = None if tok.get("bos_id") is None else self._own_id(tok["bos_id"], "bos_id")
        self.add_bos = bool(tok.get("add_bos"))

    def _own_id(self, i: int, key: str) -> int:
        if not 0 <= i < self.size:
            raise VkpackError(f"tokenizer.{key}: token id {i} is not in the archive's tokenizer ({self.size} tokens)")
        return i

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.raw.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        try:
            return self.raw.decode(list(ids), skip_special_tokens=skip_special_tokens)
        except (OverflowError, TypeError) as e:  # an id of 2^32 or more, or a negative one
            raise VkpackError(f"cannot decode token ids: {e}") from None

"""Token ids in, text deltas out, one sequence at a time, never splitting a UTF-8 character.

Decoding ids one by one and concatenating is wrong: byte-level BPE spreads one character over several tokens
(each decodes alone to U+FFFD) and SentencePiece-style decoders strip a leading space that is only right at
the start of the text. So each push decodes a short window of already-emitted tokens (the prefix) plus the new
ones and emits only the difference (the prefix/read-offset technique of vLLM and Hugging Face's DecodeStream).
A push costs O(window), not O(sequence). While the decoded tail ends in U+FFFD an incomplete character may be
waiting for its last bytes, so the text is held back; the window then grows until the character completes.

Deltas are decoded with `clean_up_tokenization_spaces=False`: that cleanup rewrites text across token
boundaries (" ." -> "."), so it cannot be streamed; modern tokenizers leave it off.
"""

from __future__ import annotations

from typing import Iterable, Sequence

REPLACEMENT_CHAR = "\ufffd"

# Prompt tokens decoded ahead of the first output token: enough for a tokenizer to see the word boundary and
# the bytes of the last character, few enough to stay cheap.
PROMPT_CONTEXT_TOKENS = 5

# Ids already behind the prefix window are dropped once this many pile up, so a long stream holds O(window).
_TRIM_AFTER = 1024


class IncrementalDetokenizer:
    """Turns one sequence's output ids into text deltas.

    With no prompt, the deltas concatenated equal `tokenizer.decode(output_ids, skip_special_tokens=...)`.
    With `prompt_token_ids`, the first delta is decoded in the prompt's context, so it carries e.g. the leading
    space a SentencePiece tokenizer drops at the start of a text (for byte-level BPE both are the same).
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids)[-PROMPT_CONTEXT_TOKENS:]
        self._ids: list[int] = context
        # _ids[prefix:read] were emitted already and are decoded again for context; _ids[read:] are pending.
        self._prefix = 0
        self._read = len(context)

    def push(self, token_ids: Iterable[int]) -> str:
        """Appends ids; returns the new text, empty while it ends inside an incomplete character."""
        self._ids.extend(token_ids)
        prefix_text, text = self._decode_window()
        if len(text) <= len(prefix_text) or text.endswith(REPLACEMENT_CHAR):
            # Nothing new yet (e.g. only skipped special tokens), or a character still waiting for its bytes.
            return ""
        return self._emit(prefix_text, text)

    def flush(self) -> str:
        """Returns whatever was held back, incomplete characters as U+FFFD: the sequence has ended."""
        prefix_text, text = self._decode_window()
        if len(text) <= len(prefix_text):
            return ""
        return self._emit(prefix_text, text)

    def _decode_window(self) -> tuple[str, str]:
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        return prefix_text, text

    def _emit(self, prefix_text: str, text: str) -> str:
        self._prefix, self._read = self._read, len(self._ids)
        if self._prefix > _TRIM_AFTER:
            del self._ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return text[len(prefix_text):]

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

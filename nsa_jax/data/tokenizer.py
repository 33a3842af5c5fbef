"""Byte-level tokenizer: a token is a byte, 0 (NUL) separates documents."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

VOCAB_SIZE = 256
DOC_SEP = 0


def encode(text: str | bytes) -> np.ndarray:
  """Text to tokens: uint8 [len(utf-8 bytes)]."""
  data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
  return np.frombuffer(data, dtype=np.uint8).copy()


def decode(tokens: Sequence[int] | np.ndarray) -> str:
  """Tokens (any int dtype, values < 256) to text; bad UTF-8 is replaced."""
  data = np.asarray(tokens, dtype=np.int64)
  if data.size and (data.min() < 0 or data.max() >= VOCAB_SIZE):
    raise ValueError(f"byte tokens must lie in [0, {VOCAB_SIZE}), got "
                     f"[{data.min()}, {data.max()}]")
  return data.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def document_ids(tokens: np.ndarray) -> np.ndarray:
  """Per-token document index of packed model inputs: int32, same shape.

  A ``DOC_SEP`` token starts the next document (it plays that document's
  beginning-of-sequence): ids count the separators up to and including each
  position along the last axis. So the last byte of a document (whose
  target is the separator) still reads its own document, and the separator
  (whose target is the next document's first byte) reads only itself.
  """
  tokens = np.asarray(tokens)
  return np.cumsum(tokens == DOC_SEP, axis=-1, dtype=np.int32)


def encode_documents(docs: Sequence[bytes]) -> np.ndarray:
  """Documents joined as ``doc0 SEP doc1 SEP ...``: uint8 [total + len(docs)].

  NUL bytes inside a document are dropped so ``DOC_SEP`` stays unambiguous.
  """
  parts = []
  for doc in docs:
    parts.append(np.frombuffer(doc.replace(b"\0", b""), dtype=np.uint8))
    parts.append(np.array([DOC_SEP], dtype=np.uint8))
  if not parts:
    return np.zeros((0,), dtype=np.uint8)
  return np.concatenate(parts)

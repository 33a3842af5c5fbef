"""Tests of the offline stdlib code corpus."""

import pytest

from nsa_jax import data


def _write(root, name, text):
  path = root / name
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def test_stdlib_is_found_offline():
  files = data.list_python_files(data.stdlib_dir())
  assert len(files) > 100
  assert all("site-packages" not in f.parts for f in files)


def test_build_from_stdlib_small_cap():
  corpus = data.build_corpus(max_bytes=400_000, val_fraction=0.2)
  assert corpus.train.size > 0 and corpus.val.size > 0
  assert not set(corpus.train_files) & set(corpus.val_files)
  assert corpus.train.size < 1_000_000
  text = data.decode(corpus.train[:2000])
  assert "import" in text or "def " in text or '"""' in text


def test_split_is_by_file_and_deterministic(tmp_path):
  for i in range(40):
    _write(tmp_path, f"pkg/mod_{i}.py", f"x = {i}\n")
  _write(tmp_path, "site-packages/third.py", "y = 1\n")
  first = data.build_corpus(tmp_path, val_fraction=0.3)
  second = data.build_corpus(tmp_path, val_fraction=0.3)
  assert first.train_files == second.train_files
  assert first.val_files == second.val_files
  assert len(first.train_files) + len(first.val_files) == 40
  assert all("site-packages" not in f for f in first.train_files)
  # Documents are joined by the separator, one per file.
  assert (first.train == data.DOC_SEP).sum() == len(first.train_files)


def test_empty_source_is_rejected(tmp_path):
  with pytest.raises(ValueError, match=r"no non-empty \.py files") as info:
    data.build_corpus(tmp_path)
  assert str(tmp_path) in str(info.value)
  _write(tmp_path, "empty.py", "\n\n")
  with pytest.raises(ValueError, match="no non-empty"):
    data.build_corpus(tmp_path)


def test_missing_source_and_bad_arguments(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    data.build_corpus(tmp_path / "nope")
  with pytest.raises(ValueError, match="val_fraction"):
    data.build_corpus(tmp_path, val_fraction=1.0)
  with pytest.raises(ValueError, match="max_bytes"):
    data.build_corpus(tmp_path, max_bytes=0)


def test_tokenizer_round_trip():
  text = "def f(x):\n  return x  # é\n"
  assert data.decode(data.encode(text)) == text
  with pytest.raises(ValueError, match="byte tokens"):
    data.decode([300])

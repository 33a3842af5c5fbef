"""Offline data: stdlib code corpus, synthetic tasks, resumable iterators."""

from nsa_jax.data.corpus import build_corpus
from nsa_jax.data.corpus import Corpus
from nsa_jax.data.corpus import list_python_files
from nsa_jax.data.corpus import stdlib_dir
from nsa_jax.data.iterators import Batch
from nsa_jax.data.iterators import eval_batches
from nsa_jax.data.iterators import MixedIterator
from nsa_jax.data.iterators import PackedIterator
from nsa_jax.data.iterators import StepIterator
from nsa_jax.data.iterators import SyntheticIterator
from nsa_jax.data.synthetic import Example
from nsa_jax.data.synthetic import mqar_example
from nsa_jax.data.synthetic import passkey_example
from nsa_jax.data.synthetic import stack_examples
from nsa_jax.data.token_ids import check_token_ids
from nsa_jax.data.tokenizer import decode
from nsa_jax.data.tokenizer import DOC_SEP
from nsa_jax.data.tokenizer import document_ids
from nsa_jax.data.tokenizer import encode
from nsa_jax.data.tokenizer import VOCAB_SIZE

"""Implementations of the ops that are neither the reference nor plain XLA.

One file per implementation: its ``supports`` predicates and the adapters
from the op signatures of ``nsa_jax.ops`` to the code that runs. Registered
in ``nsa_jax.ops`` (one line each).
"""

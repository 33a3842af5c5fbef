"""Pallas Triton kernels of NSA and SeerAttention-R (jax only, no flax)."""

from pallas_kernels.attention_block_max import attention_block_max
from pallas_kernels.block_scores import block_scores
from pallas_kernels.block_scores import ScoreLaunch
from pallas_kernels.block_select import select_blocks
from pallas_kernels.block_select import supports_selection
from pallas_kernels.compressed_attention import compressed_attention
from pallas_kernels.decode_attention import block_sparse_decode
from pallas_kernels.launch_config import LaunchConfig
from pallas_kernels.launch_config import SelectedLaunchConfig
from pallas_kernels.selected_attention import selected_attention
from pallas_kernels.selected_attention import supports_block_size
from pallas_kernels.sliding_window import sliding_window_attention
from pallas_kernels.triton_compat import default_interpret

__all__ = [
    "LaunchConfig",
    "ScoreLaunch",
    "SelectedLaunchConfig",
    "attention_block_max",
    "block_scores",
    "block_sparse_decode",
    "compressed_attention",
    "default_interpret",
    "select_blocks",
    "selected_attention",
    "sliding_window_attention",
    "supports_block_size",
    "supports_selection",
]

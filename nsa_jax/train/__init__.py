"""Training: AdamW loop, orbax checkpoints, metrics, plots, train_lm runs."""

from nsa_jax.train import cli
from nsa_jax.train import presets
from nsa_jax.train import runs
from nsa_jax.train.checkpoint import Checkpointer
from nsa_jax.train.checkpoint import CheckpointError
from nsa_jax.train.checkpoint import CorruptCheckpointError
from nsa_jax.train.config import TrainConfig
from nsa_jax.train.loop import evaluate
from nsa_jax.train.loop import RunResult
from nsa_jax.train.loop import train
from nsa_jax.train.metrics import MetricsWriter
from nsa_jax.train.metrics import read_metrics
from nsa_jax.train.optim import make_optimizer
from nsa_jax.train.optim import make_schedule
from nsa_jax.train.plotting import plot_heatmaps
from nsa_jax.train.plotting import plot_runs
from nsa_jax.train.retrieval import accuracy_grid
from nsa_jax.train.retrieval import hits_grid
from nsa_jax.train.retrieval import passkey_accuracy
from nsa_jax.train.retrieval import passkey_hits
from nsa_jax.train.steps import eval_step
from nsa_jax.train.steps import masked_loss_sum
from nsa_jax.train.steps import predict_step
from nsa_jax.train.steps import SplitTrainStep
from nsa_jax.train.steps import train_step

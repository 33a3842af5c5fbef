"""Training on a mesh: same losses as one device, checkpoints across meshes."""

import json

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nsa_jax import NSAConfig
from nsa_jax import parallel
from nsa_jax import train
from nsa_jax.modules import LMConfig
from nsa_jax.modules import TransformerLM
from nsa_jax.parallel import rules

LM = LMConfig(vocab_size=256, d_model=32, num_layers=1, num_heads=4,
              num_kv_heads=2, head_dim=16, mlp_hidden=64, impl="xla",
              compression="mean",
              nsa=NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16,
                            num_selected=3, num_initial=1, num_local=1,
                            window=12))
STEPS, BATCH, SEQ = 3, 4, 64


class _Batches:
  """A StepIterator of fixed random batches (state: the step)."""

  batch_size, seq_len = BATCH, SEQ

  def __init__(self):
    rng = np.random.default_rng(0)
    self.batches = [{
        "inputs": rng.integers(0, 256, (BATCH, SEQ), dtype=np.int32),
        "targets": rng.integers(0, 256, (BATCH, SEQ), dtype=np.int32),
        "mask": np.ones((BATCH, SEQ), np.float32)} for _ in range(STEPS)]
    self.step = 0

  def __next__(self):
    self.step += 1
    return self.batches[self.step - 1]

  def state(self):
    return {"step": self.step}

  def restore(self, state):
    self.step = state["step"]


def _mesh(**sizes):
  cfg = parallel.MeshConfig(**sizes)
  return cfg.make(jax.devices()[:int(np.prod(cfg.sizes))])


def _lm(seed=0):
  return TransformerLM(LM, rngs=nnx.Rngs(seed))


def _pure(node):
  return nnx.to_pure_dict(nnx.state(node))


def test_sharded_training_matches_one_device(tmp_path):
  cfg = train.TrainConfig(steps=STEPS, batch_size=BATCH, seq_len=SEQ,
                          lr=1e-2, warmup_steps=0, log_every=1,
                          ckpt_every=0, async_checkpoints=False,
                          progress=False)
  model = _lm()
  optimizer = nnx.Optimizer(model, train.make_optimizer(cfg), wrt=nnx.Param)
  data = _Batches()
  want = []
  for _ in range(STEPS):
    out = train.train_step(model, optimizer, {
        k: jnp.asarray(v) for k, v in next(data).items()})
    want.append((float(out["loss"]), float(out["grad_norm"])))
  # Every axis at once: batch over fsdp, heads over tensor, T over sequence.
  par = parallel.Parallelism(_mesh(fsdp=2, tensor=2, sequence=2))
  sharded = _lm()
  train.train(sharded, cfg, _Batches(), tmp_path, parallel=par,
              log=lambda _: None)
  rows = train.read_metrics(tmp_path / "metrics.jsonl")
  got = [(r["loss"], r["grad_norm"]) for r in rows if r["kind"] == "train"]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  kernel = sharded.layers[0].attn.q_proj.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_checkpoint_restores_onto_another_mesh(tmp_path):
  par = parallel.Parallelism(_mesh(fsdp=4, tensor=2))
  model = _lm()
  par.shard(model)
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
  par.shard(optimizer)
  optimizer.update(model, jax.tree.map(jnp.ones_like,
                                       nnx.state(model, nnx.Param)))
  with train.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, model, optimizer, jax.random.key(3), {"step": 1})
  for target in (_mesh(data=2, fsdp=2, sequence=2), None):  # None: 1 device
    other = _lm(seed=1)
    other_opt = nnx.Optimizer(other, optax.adamw(1e-2), wrt=nnx.Param)
    if target is not None:
      parallel.Parallelism(target).shard(other)
      parallel.Parallelism(target).shard(other_opt)
    with train.Checkpointer(tmp_path) as ckpt:
      assert ckpt.restore(other, other_opt).step == 1
    chex.assert_trees_all_equal(_pure(other), _pure(model))
    chex.assert_trees_all_equal(_pure(other_opt), _pure(optimizer))
    mu = other_opt.opt_state[0].mu["layers"][0]["mlp"]["up"]["kernel"][...]
    if target is None:
      assert len(mu.sharding.device_set) == 1
    else:  # [d_model, mlp]: d_model over fsdp, mlp over tensor (size 1)
      assert mu.sharding.is_equivalent_to(jax.sharding.NamedSharding(
          target, jax.sharding.PartitionSpec("fsdp")), mu.ndim)


def test_create_builds_the_model_on_its_shards():
  par = parallel.Parallelism(_mesh(fsdp=2, tensor=4))
  make = lambda: nnx.Linear(8, 16, rngs=nnx.Rngs(0))
  made = par.create(make)
  # A Linear is no rule's: replicated, and the same numbers as eagerly.
  assert made.kernel[...].sharding.mesh.shape == par.mesh.shape
  chex.assert_trees_all_equal(_pure(made), _pure(make()))
  mlp = par.create(lambda: TransformerLM(
      LMConfig(vocab_size=16, d_model=8, num_layers=1, num_heads=4,
               num_kv_heads=4, head_dim=2, mlp_hidden=8, attention="full"),
      rngs=nnx.Rngs(0))).layers[0].mlp.up.kernel[...]
  assert mlp.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_rules_split_parameters_and_their_moments():
  mesh = _mesh(fsdp=2, tensor=4)
  model = nnx.eval_shape(_lm)
  optimizer = nnx.eval_shape(
      lambda: nnx.Optimizer(_lm(), optax.adamw(1e-3), wrt=nnx.Param))
  specs = {rules.path_name(p): s.spec for p, s in
           jax.tree_util.tree_flatten_with_path(
               rules.state_shardings(nnx.state(optimizer), mesh))[0]}
  P = jax.sharding.PartitionSpec
  assert specs["opt_state/0/mu/layers/0/attn/k_proj/slc/kernel"] == P(
      "fsdp", "tensor")
  assert specs["opt_state/0/nu/layers/0/mlp/down/kernel"] == P(
      "tensor", "fsdp")
  assert specs["opt_state/0/mu/embed/embedding"] == P("tensor", "fsdp")
  assert specs["opt_state/0/mu/final_norm/scale"] == P(None)
  assert specs["opt_state/0/count"] == P()
  assert rules.batch_spec(_mesh(data=2, fsdp=2, sequence=2)) == P(
      ("data", "fsdp"), "sequence")
  with pytest.raises(ValueError, match=r"layers/0/attn/gate_proj/bias "
                     r"\[12\]: dimension 12 does not split over mesh axes "
                     "tensor of size 8"):
    rules.state_shardings(nnx.state(model), _mesh(tensor=8))


@pytest.mark.parametrize("sizes, message", [
    (dict(data=0), "data=0 must be a positive int or -1"),
    (dict(data=-1, fsdp=-1), "only one mesh axis may be -1"),
    (dict(sequence=3), "needs 3 devices, but there are 8"),
    (dict(tensor=3, data=-1), "does not divide the 8 devices"),
])
def test_bad_mesh_is_refused(sizes, message):
  with pytest.raises(ValueError, match=message):
    parallel.MeshConfig(**sizes).make()


def test_mesh_takes_the_rest_with_minus_one():
  mesh = parallel.MeshConfig(data=-1, sequence=2).make()
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 1,
                              "sequence": 2}


def _plan(argv):
  args, parser = train.cli.parse(argv)
  return train.cli.resolve(args, parser)


def test_device_flags_choose_the_mesh():
  assert _plan([]).devices.mesh is None  # one device, as before
  plan = _plan(["--mesh-fsdp", "-1", "--mesh-sequence", "2",
                "--context-parallel", "gather", "--cp-capacity", "2"])
  assert plan.devices.mesh == parallel.MeshConfig(fsdp=-1, sequence=2)
  assert plan.devices.context == parallel.ContextParallel("gather", 2)
  par = plan.devices.parallelism(batch_size=4, seq_len=64, num_heads=4,
                                 num_kv_heads=2)
  assert dict(par.mesh.shape)["fsdp"] == 4
  assert json.dumps(train.runs.run_config(plan, LM))  # mesh not in it


@pytest.mark.parametrize("argv, message", [
    (["--cp-capacity", "2"], "--cp-capacity applies to --context-parallel "
     "gather"),
    (["--context-parallel", "heads"], "needs a mesh with a sequence axis"),
    (["--process-id", "1"], "--process-id needs --distributed"),
    (["--mesh-data", "0"], "data=0 must be a positive int"),
    (["--mesh-data", "2", "--documents"], "--documents is not supported "
     "with a device mesh"),
])
def test_bad_device_flags(capsys, argv, message):
  with pytest.raises(SystemExit) as info:
    _plan(argv)
  assert info.value.code == 2
  assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, model, message", [
    (["--mesh-data", "3"], {}, "needs 3 devices, but there are 8"),
    (["--mesh-data", "8"], {}, "micro-batch (batch_size / grad_accum) = 4 "
     "does not split"),
    (["--mesh-tensor", "4", "--mesh-data", "2"], {"num_kv_heads": 2},
     "num_kv_heads = 2 does not split"),
    (["--mesh-data", "4", "--mesh-tensor", "2", "--context-parallel",
      "gather"], {}, "need a split sequence"),
])
def test_mesh_that_does_not_fit_is_refused(argv, model, message):
  devices = _plan(argv).devices
  shapes = dict(batch_size=4, seq_len=64, num_heads=4, num_kv_heads=4)
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(
      ")", r"\)")):
    devices.parallelism(**{**shapes, **model})

"""The optimizer and the one jitted, sharded Bitune train step.

Only the trainable tree (adapter sets and mixing coefficients) is
differentiated and optimized; the frozen base parameters are an ordinary
input of the step, so they get no gradient and hold no optimizer state.
``optax.multi_transform`` gives each trainable group its own transform:
``adapters`` (AdamW with the main schedule) and ``mix`` (AdamW with its own
learning rate, no weight decay).

Example:

    >>> import jax, jax.numpy as jnp
    >>> from bitune_jax.model.config import ModelConfig
    >>> from bitune_jax.model.transformer import init_params
    >>> from bitune_jax import bitune
    >>> cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32,
    ...                   intermediate_size=64, num_layers=2, num_heads=4,
    ...                   num_kv_heads=2, head_dim=8)
    >>> base = init_params(jax.random.PRNGKey(0), cfg)
    >>> method = bitune.MethodConfig()
    >>> opt = make_optimizer(OptimConfig(lr=1e-3), total_steps=10)
    >>> state = init_state(bitune.init_trainable(jax.random.PRNGKey(1), cfg, method, base), opt)
    >>> step = make_train_step(cfg, method, opt)
    >>> batch = {"prompt_ids": jnp.array([[1, 2, 3]]), "prompt_len": jnp.array([3]),
    ...          "answer_ids": jnp.array([[4, 5]]), "answer_len": jnp.array([2])}
    >>> state, metrics = step(state, base, batch)
    >>> int(state.step)
    1
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bitune_jax import bitune, schema
from bitune_jax.training import sharding as shd
from bitune_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer hyperparameters (the ``optim`` config section; defaults: the paper's instruction tuning).

    :func:`make_optimizer` builds AdamW on the adapters and AdamW with its own
    learning rate and decay on the mixing parameters from them.

    Attributes:
      lr: peak learning rate of the adapters (paper: 3e-4 instruction tuning,
        1e-3 single task).
      schedule: ``linear`` (warmup then linear decay to 0, as in the paper),
        ``cosine`` (warmup then cosine decay to 0) or ``constant`` (after
        warmup).
      warmup_ratio: fraction of the total steps spent warming up linearly.
      weight_decay: AdamW decoupled weight decay of the adapters.
      b1, b2: Adam moment decay rates.
      eps: Adam's denominator epsilon.
      grad_clip: global gradient-norm clip; None disables clipping.
      grad_accum: micro-batches whose gradients are averaged into one update
        (the ``grad_accum`` of :func:`make_train_step`; the training loop
        feeds one step that many data batches).
      mix_lr: peak learning rate of the mixing parameters theta (same
        schedule); None uses ``lr``.
      mix_weight_decay: weight decay of the mixing parameters.
    """

    lr: float = schema.field(3e-4, gt=0.0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = schema.field(0.1, ge=0.0, le=1.0)
    weight_decay: float = schema.field(0.0, ge=0.0)
    b1: float = schema.field(0.9, ge=0.0, lt=1.0)
    b2: float = schema.field(0.999, ge=0.0, lt=1.0)
    eps: float = schema.field(1e-8, gt=0.0)
    grad_clip: Optional[float] = schema.field(1.0, gt=0.0)
    grad_accum: int = schema.field(1, ge=1)
    mix_lr: Optional[float] = schema.field(None, gt=0.0)
    mix_weight_decay: float = schema.field(0.0, ge=0.0)

    def __post_init__(self):
        schema.validate(self, "optim")


def make_schedule(lr: float, kind: str, total_steps: int, warmup_ratio: float):
    """Warmup (linear from 0) then linear decay to 0, cosine decay to 0, or constant."""
    total = max(int(total_steps), 1)
    warm = int(round(warmup_ratio * total))
    if kind == "linear":
        decay = optax.linear_schedule(lr, 0.0, max(total - warm, 1))
    elif kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, max(total - warm, 1))
    elif kind == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"optim.schedule={kind!r}; allowed: linear, cosine, constant")
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])


def param_labels(trainable):
    """``"mix"`` for mixing coefficients, ``"adapters"`` for every adapter leaf."""
    return {k: jax.tree_util.tree_map(lambda _: "mix" if k == "mix" else "adapters", v) for k, v in trainable.items()}


def make_optimizer(oc: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Gradient clipping, then per-group AdamW via ``optax.multi_transform``."""
    def adamw(lr, wd):
        return optax.adamw(make_schedule(lr, oc.schedule, total_steps, oc.warmup_ratio), b1=oc.b1, b2=oc.b2,
                           eps=oc.eps, weight_decay=wd)

    groups = optax.multi_transform(
        {"adapters": adamw(oc.lr, oc.weight_decay),
         "mix": adamw(oc.mix_lr if oc.mix_lr is not None else oc.lr, oc.mix_weight_decay)},
        param_labels)
    if oc.grad_clip:
        return optax.chain(optax.clip_by_global_norm(oc.grad_clip), groups)
    return groups


class TrainState(NamedTuple):
    step: jax.Array
    trainable: Any
    opt_state: Any


def init_state(trainable, optimizer) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable))


def _metrics(loss, aux, grads, trainable, method):
    m = {"loss": loss, "grad_norm": optax.global_norm(grads),
         "answer_tokens": aux["num_tokens"].sum()}
    if "mix" in trainable:
        m["alpha_k"] = bitune.mix_alpha(trainable["mix"]["theta_k"], method.theta_init)
        m["alpha_v"] = bitune.mix_alpha(trainable["mix"]["theta_v"], method.theta_init)
    return m


def make_train_step(cfg: ModelConfig, method: bitune.MethodConfig, optimizer, *, mesh=None, state=None, base=None,
                    batch=None, grad_accum: int = 1, remat: str = "none", attention: str = "auto",
                    dropout_seed: Optional[int] = None, donate: bool = True, rules=shd.DEFAULT_RULES):
    """Returns ``step(state, base, batch) -> (state, metrics)``, jitted.

    With ``mesh`` (and example ``state``, ``base``, ``batch`` trees to read
    shapes from), the step gets explicit ``in_shardings``/``out_shardings``
    from the logical axis names of every array and the ``rules`` table
    (:mod:`bitune_jax.training.sharding`): parameters, adapters and optimizer
    state as their axes say, the batch over (data, fsdp), metrics replicated.

    ``grad_accum`` splits the batch into that many equal micro-batches and
    averages their gradients; since every micro-batch has the same number of
    examples, the loss is still the mean over all examples.
    """
    def loss_of(trainable, base, mb, rng):
        return bitune.loss_fn(trainable, base, cfg, method, mb, remat=remat, attention=attention, dropout_rng=rng)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def step(state: TrainState, base, batch):
        rng = None if dropout_seed is None else jax.random.fold_in(jax.random.PRNGKey(dropout_seed), state.step)
        if grad_accum == 1:
            (loss, aux), grads = grad_fn(state.trainable, base, batch, rng)
        else:
            b = jax.tree_util.tree_leaves(batch)[0].shape[0]  # rows (examples, or packed rows)
            if b % grad_accum:
                raise ValueError(f"batch size {b} is not divisible by grad_accum={grad_accum}")
            micro = jax.tree_util.tree_map(lambda x: x.reshape(grad_accum, b // grad_accum, *x.shape[1:]), batch)

            def acc(carry, xs):
                mb, i = xs
                r = None if rng is None else jax.random.fold_in(rng, i)
                (l, a), g = grad_fn(state.trainable, base, mb, r)
                gsum, lsum = carry
                return (jax.tree_util.tree_map(jnp.add, gsum, g), lsum + l), a

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
            (gsum, lsum), auxs = jax.lax.scan(acc, (zeros, 0.0), (micro, jnp.arange(grad_accum)))
            grads = jax.tree_util.tree_map(lambda g: g / grad_accum, gsum)
            loss = lsum / grad_accum
            aux = jax.tree_util.tree_map(lambda x: x.reshape(-1), auxs)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        new = TrainState(state.step + 1, trainable, opt_state)
        return new, _metrics(loss, aux, grads, trainable, method)

    if mesh is None:
        return jax.jit(step, donate_argnums=(0,) if donate else ())
    if state is None or base is None or batch is None:
        raise ValueError("make_train_step with a mesh needs example state, base and batch trees for shardings")

    def step_on_mesh(state, base, batch):
        # Activations carry logical axis names too (transformer.constrain); they bind while tracing here.
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return step(state, base, batch)

    state_sh = state_shardings(mesh, state, cfg, rules)
    base_sh = shd.base_shardings(mesh, base, cfg, rules)
    batch_sh = shd.batch_sharding(mesh, batch, rules)
    metric_sh = shd.replicated(mesh)
    return jax.jit(step_on_mesh, in_shardings=(state_sh, base_sh, batch_sh), out_shardings=(state_sh, metric_sh),
                   donate_argnums=(0,) if donate else ())


def state_shardings(mesh, state: TrainState, cfg: ModelConfig, rules=shd.DEFAULT_RULES):
    """Shardings of a :class:`TrainState` from the logical axes of its trainable tree."""
    trainable_sh = shd.tree_shardings(mesh, state.trainable, shd.trainable_axes(state.trainable, cfg), rules)
    return TrainState(shd.replicated(mesh), trainable_sh,
                      shd.opt_state_shardings(mesh, state.opt_state, state.trainable, trainable_sh))


def place(mesh, state: TrainState, base, batch=None, *, cfg: ModelConfig, rules=shd.DEFAULT_RULES):
    """Moves state, base (and batch) onto the mesh with the step's shardings."""
    out = (jax.device_put(state, state_shardings(mesh, state, cfg, rules)),
           jax.device_put(base, shd.base_shardings(mesh, base, cfg, rules)))
    if batch is not None:
        out += (jax.device_put(batch, shd.batch_sharding(mesh, batch, rules)),)
    return out

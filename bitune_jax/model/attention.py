"""Attention kernels and masks.

Implementations (the ``model.attention`` config key and the ``--attention``
flag of every command select one; :data:`IMPLEMENTATIONS`):

* ``reference``: dense masked attention; runs on every backend and defines
  the numerics (scores and softmax in float32);
* ``blocked``: :func:`blocked_attention`, an online softmax over key blocks
  whose backward pass recomputes the probabilities, so no ``[q, k]`` score or
  probability tensor is saved for the backward pass (pure JAX, any backend);
  the model runs a long causal stream with an ``ordered`` mask in chunks of
  queries that skip the keys after them
  (``bitune_jax.model.transformer.CAUSAL_CHUNK``);
* ``xla``: ``jax.nn.dot_product_attention(implementation="xla")``;
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``,
  cuDNN's fused flash attention (GPU only);
* ``splash``: :func:`splash_attention`, the Pallas splash-attention kernel
  (TPU only; every stream, sliding windows and logit softcapping included;
  :mod:`bitune_jax.model.splash`);
* ``auto``: splash on TPUs, cuDNN on GPUs where it applies, ``blocked`` on
  CPUs (:func:`resolve`; explicit dense masks fall back to the reference).
  On CPU, at SmolLM2-135M's shapes (prompt 191, answer 64), ``blocked`` runs
  a forward+backward 1.5x (prompt streams) to 2.4x (answer stream) faster
  than the reference and 1.5x faster than ``xla``.

Tests compare every implementation that runs on the test machine with the
reference (splash through Pallas's interpreter: :func:`splash_interpret`).

An attention mask is described by :class:`Mask`: per-token positions and
validity of the queries and keys plus a static ``causal`` flag. The dense
boolean form ``[batch, q_len, k_len]`` (True where a query may attend to a
key) is built from it by :func:`make_mask`, so one description serves causal,
bidirectional and sliding-window attention, and keys from a prefix cache that
sit before the queries (a key is "earlier" by position, not by index).
Kernels that take segment ids and block masks instead of a dense array read
the same description.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct
from jax.ad_checkpoint import checkpoint_name

_NEG = -1e30  # finite, so fully-masked (padding) rows stay NaN-free


def make_mask(q_pos, k_pos, q_valid, k_valid, *, causal: bool, window: Optional[int] = None,
              q_segment=None, k_segment=None):
    """Boolean attention mask ``[batch, q_len, k_len]``.

    Args:
      q_pos, k_pos: integer positions ``[batch, q_len]`` / ``[batch, k_len]``.
      q_valid, k_valid: booleans, False at padding.
      causal: keys must not be after the query.
      window: sliding-window size; a key is visible when it is less than
        ``window`` positions before the query (and, for bidirectional masks,
        less than ``window`` positions after it).
      q_segment, k_segment: optional integer segment ids ``[batch, q_len]`` /
        ``[batch, k_len]`` (packed rows: one id per example); a query sees
        only keys of its own segment. None (both): one segment per row.
    """
    qp = q_pos[:, :, None]
    kp = k_pos[:, None, :]
    m = k_valid[:, None, :] & q_valid[:, :, None]
    if causal:
        m = m & (kp <= qp)
    if window is not None:
        m = m & (jnp.abs(qp - kp) < window)
    if (q_segment is None) != (k_segment is None):
        raise ValueError("make_mask: pass both q_segment and k_segment, or neither")
    if q_segment is not None:
        m = m & (q_segment[:, :, None] == k_segment[:, None, :])
    return m


@struct.dataclass
class Mask:
    """Which keys each query may see, described by positions and validity.

    ``q_pos``/``q_valid`` are ``[batch, q_len]``, ``k_pos``/``k_valid``
    ``[batch, k_len]`` (keys of a prefix cache first, then the queries' own
    keys). A query sees a valid key when the key is not later than the query
    (``causal``) or always (bidirectional); a sliding-window layer further
    requires ``|q_pos - k_pos| < window``. With segment ids
    (``q_segment [batch, q_len]``, ``k_segment [batch, k_len]``, int32; a
    packed row holds several examples, one segment id each) a query further
    sees only keys of its own segment; None (the default) is one segment per
    row. ``ordered`` (static) says that, within each segment, the positions of
    the stream's own tokens (the keys after the prefix, in the queries' order)
    strictly increase with the index, as for every mask this package builds
    from its own positions: a causal query then sees none of its own stream's
    keys at a later index, and ``blocked`` attention skips them.

    >>> import jax.numpy as jnp
    >>> pos = jnp.arange(3)[None]
    >>> ok = jnp.ones((1, 3), bool)
    >>> Mask(pos, pos, ok, ok, causal=True).dense()[0].astype(int).tolist()
    [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    >>> seg = jnp.array([[1, 1, 2]])  # two examples in one row; the second restarts at position 0
    >>> Mask.over(jnp.array([[0, 1, 0]]), ok, causal=True, segment=seg).dense()[0].astype(int).tolist()
    [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    """

    q_pos: jax.Array
    k_pos: jax.Array
    q_valid: jax.Array
    k_valid: jax.Array
    causal: bool = struct.field(pytree_node=False, default=True)
    q_segment: Optional[jax.Array] = None
    k_segment: Optional[jax.Array] = None
    ordered: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def over(cls, positions, valid, *, causal: bool, prefix_positions=None, prefix_valid=None, segment=None,
             prefix_segment=None, ordered: bool = False) -> "Mask":
        """The mask of tokens attending to themselves, after an optional prefix cache.

        ``segment`` (and ``prefix_segment`` with a prefix) are the tokens'
        segment ids; give both or neither when there is a prefix. ``ordered``:
        see the class docstring (only a caller that built ``positions`` can
        promise it).
        """
        k_pos, k_valid, k_segment = positions, valid, segment
        if prefix_positions is not None:
            if (segment is None) != (prefix_segment is None):
                raise ValueError("Mask.over: with a prefix, pass both segment and prefix_segment, or neither")
            k_pos = jnp.concatenate([prefix_positions, positions], axis=1)
            k_valid = jnp.concatenate([prefix_valid, valid], axis=1)
            if segment is not None:
                k_segment = jnp.concatenate([prefix_segment, segment], axis=1)
        elif prefix_segment is not None:
            raise ValueError("Mask.over: prefix_segment needs prefix_positions")
        return cls(positions, k_pos, valid, k_valid, causal=causal, q_segment=segment, k_segment=k_segment,
                   ordered=ordered)

    def dense(self, window: Optional[int] = None) -> jax.Array:
        """Boolean ``[batch, q_len, k_len]``; ``window`` for sliding-window layers."""
        return make_mask(self.q_pos, self.k_pos, self.q_valid, self.k_valid, causal=self.causal, window=window,
                         q_segment=self.q_segment, k_segment=self.k_segment)


def stack_segments(masks):
    """``(q_segment, k_segment)`` of ``masks`` stacked on the batch axis, or ``(None, None)``.

    For kernels that run several streams' masks as one call: None when no
    mask has segment ids; otherwise a mask without them counts as one segment
    (id 0) per row.
    """
    if all(m.q_segment is None for m in masks):
        return None, None

    def seg(m, name, like):
        s = getattr(m, name)
        return jnp.zeros(like.shape, jnp.int32) if s is None else s.astype(jnp.int32)

    return (jnp.concatenate([seg(m, "q_segment", m.q_pos) for m in masks], 0),
            jnp.concatenate([seg(m, "k_segment", m.k_pos) for m in masks], 0))


IMPLEMENTATIONS = ("reference", "blocked", "xla", "cudnn", "splash", "auto")

# Whether `splash` runs through Pallas's interpreter (any backend, slow: tests on CPU). Off unless the
# environment variable BITUNE_SPLASH_INTERPRET=1 or the `splash_interpret()` context says so.
_SPLASH_INTERPRET = contextvars.ContextVar(
    "splash_interpret", default=os.environ.get("BITUNE_SPLASH_INTERPRET", "0").lower() not in ("", "0", "false"))


@contextlib.contextmanager
def splash_interpret(enabled: bool = True):
    """Within this context, ``splash`` attention runs in Pallas's interpreter on any backend.

    The kernel is a TPU kernel; elsewhere ``attention="splash"`` is an error
    unless interpreted (slow, for tests: the interpreter executes the same
    kernel code on CPU). Setting ``BITUNE_SPLASH_INTERPRET=1`` in the
    environment does the same for a whole process. The choice is read when a
    function is traced.
    """
    token = _SPLASH_INTERPRET.set(enabled)
    try:
        yield
    finally:
        _SPLASH_INTERPRET.reset(token)


def _platform(backend: Optional[str]) -> str:
    """``backend``, else the platform of the mesh being traced for (a TPU topology on a CPU host), else JAX's."""
    if backend:
        return backend
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def resolve(impl: str, *, softcap: Optional[float] = None, backend: Optional[str] = None) -> str:
    """The implementation ``impl`` stands for on ``backend``, checked.

    ``backend`` defaults to the platform of the abstract mesh being traced
    for, else JAX's default backend. ``auto`` becomes ``splash`` on TPUs,
    ``cudnn`` on GPUs (the reference when logits are softcapped, which cuDNN
    cannot do) and ``blocked`` elsewhere (on CPUs the fastest, and it keeps
    no ``[q, k]`` tensor for the backward pass). An implementation that
    cannot serve the case raises ``ValueError`` naming it and what to use
    instead.

    >>> resolve("auto", backend="cpu"), resolve("auto", backend="gpu"), resolve("auto", softcap=50.0, backend="gpu")
    ('blocked', 'cudnn', 'reference')
    >>> resolve("auto", softcap=50.0, backend="tpu")
    'splash'
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention={impl!r}; allowed: {', '.join(IMPLEMENTATIONS)}")
    backend = _platform(backend)
    if impl == "auto":
        if backend == "tpu":
            return "splash"
        if backend in ("gpu", "cuda"):
            return "reference" if softcap is not None else "cudnn"
        return "blocked"
    if impl in ("xla", "cudnn") and softcap is not None:
        raise ValueError(f"attention={impl!r} cannot apply attention logit softcapping (this model has "
                         f"attn_logit_softcap={softcap}); use 'reference', 'blocked' or 'auto'")
    if impl == "cudnn" and backend not in ("gpu", "cuda"):
        raise ValueError(f"attention='cudnn' needs a GPU (this run's backend is {backend!r}); use 'auto'")
    if impl == "splash" and backend != "tpu" and not _SPLASH_INTERPRET.get():
        raise ValueError(f"model.attention='splash' (the Pallas TPU kernel) needs a TPU (this run's backend is "
                         f"{backend!r}); use 'auto', or run the kernel in Pallas's interpreter (slow, for tests) "
                         f"with BITUNE_SPLASH_INTERPRET=1 or bitune_jax.model.attention.splash_interpret()")
    return impl


def splash_attention(q, k, v, mask: Mask, *, scale: float, softcap: Optional[float] = None,
                     window: Optional[int] = None, is_local=False, block: int = 512):
    """Grouped-query attention of one stream with splash attention (:mod:`bitune_jax.model.splash`).

    Args:
      q: ``[batch, q_len, heads, head_dim]``.
      k, v: ``[batch, k_len, kv_heads, head_dim]`` (prefix keys first, then the queries' own).
      mask: the stream's :class:`Mask` (not a dense array: the kernel takes
        a static mask plus segment ids, see the splash module).
      scale, softcap: as :func:`dot_product_attention`.
      window: the model's sliding window, None without local layers.
      is_local: (traced) bool, True on sliding-window layers.
      block: the largest kernel block size to use (a power of two >= 128).

    Returns ``[batch, q_len, heads, head_dim]`` in q's dtype; padding queries are zero.
    """
    from bitune_jax.model import splash

    resolve("splash", softcap=softcap)
    if not isinstance(mask, Mask):
        raise ValueError("model.attention='splash' builds its mask from positions, validity and segments: pass "
                         "attention.Mask objects, not dense mask arrays")
    return splash.attention(q, k, v, mask, scale=scale, softcap=softcap, window=window, is_local=is_local,
                            block=block, interpret=_SPLASH_INTERPRET.get())


def dot_product_attention(q, k, v, mask, *, scale: float, softcap: Optional[float] = None, impl: str = "reference"):
    """Grouped-query attention.

    Args:
      q: ``[batch, q_len, heads, head_dim]``.
      k, v: ``[batch, k_len, kv_heads, head_dim]``.
      mask: boolean ``[batch, q_len, k_len]``.
      scale: multiplier of the scores.
      softcap: optional ``c * tanh(s / c)`` logit cap (Gemma).
      impl: "reference" (dense, everywhere), "xla" or "cudnn"
        (``jax.nn.dot_product_attention``; neither supports logit softcapping).

    Returns:
      ``[batch, q_len, heads, head_dim]`` in q's dtype.
    """
    b, tq, h, d = q.shape
    kvh = k.shape[2]
    if impl in ("xla", "cudnn"):
        resolve(impl, softcap=softcap)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale, implementation=impl)
        # Rows with no visible key (padding) are zero, as in the reference.
        return jnp.where(mask.any(-1)[:, :, None, None], out, 0).astype(q.dtype)
    if impl != "reference":
        raise ValueError(f"attention={impl!r} is not a dense-mask implementation; allowed here: reference, xla, cudnn")
    g = h // kvh
    qg = q.reshape(b, tq, kvh, g, d)
    # [batch, kv_heads, group, q_len, k_len]
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(mask[:, None, None], s, _NEG)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask[:, None, None], p, 0.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v)
    return out.reshape(b, tq, h, d)


# --------------------------------------------------------------------------- blocked attention
def blocked_attention(q, k, v, q_pos, k_pos, q_valid, k_valid, causal, window, *, scale: float,
                      softcap: Optional[float] = None, block: int = 512, q_segment=None, k_segment=None):
    """Grouped-query attention over key blocks with an online softmax; nothing ``[q, k]``-sized is saved.

    The mask is computed block by block from positions and validity (never
    materialised whole): query ``i`` of row ``b`` sees key ``j`` when both are
    valid, ``k_pos <= q_pos`` where ``causal[b]``,
    ``|q_pos - k_pos| < window`` and, with segment ids (``q_segment
    [batch, q_len]``, ``k_segment [batch, k_len]``; packed rows), the two
    segment ids are equal. The backward pass recomputes each block's
    probabilities from the saved log-sum-exp (flash-attention style), so the
    residuals are the inputs, the output and one float per query and head.

    Args:
      q: ``[batch, q_len, heads, head_dim]``; k, v: ``[batch, k_len, kv_heads, head_dim]``.
      q_pos, q_valid: ``[batch, q_len]``; k_pos, k_valid: ``[batch, k_len]``.
      causal: bool ``[batch]`` (rows of different mask kinds can share a call).
      window: int scalar (may be traced); a huge value means no window.
      block: keys per block (the key length is padded up to a multiple); all
        keys form one block when there are at most ``block`` of them or the
        queries are few (decoding: ``q_len * k_len <= block ** 2``).

    Returns ``[batch, q_len, heads, head_dim]`` in q's dtype; rows with no
    visible key are zero, as in the reference.
    """
    tk = k.shape[1]
    if tk <= block or q.shape[1] * tk <= block * block:
        block = tk  # one block (scores no larger than a block x block tile): no padding, no loop
    pad = -tk % block
    if pad:
        k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (k, v))
        k_pos = jnp.pad(k_pos, ((0, 0), (0, pad)))
        k_valid = jnp.pad(k_valid, ((0, 0), (0, pad)))
        if k_segment is not None:
            k_segment = jnp.pad(k_segment, ((0, 0), (0, pad)))
    if (q_segment is None) != (k_segment is None):
        raise ValueError("blocked_attention: pass both q_segment and k_segment, or neither")
    out = _blocked(q, k, v, q_pos, k_pos, q_valid, k_valid, causal, jnp.asarray(window, jnp.int32),
                   q_segment, k_segment, float(scale), softcap, block)
    return out


def _blocks(x, block):
    """``[b, n*block, ...] -> [n, b, block, ...]`` (scan over key blocks)."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // block, block, *x.shape[2:]), 1, 0)


def _scan_blocks(step, init, xs):
    """``lax.scan(step, init, xs)`` over key blocks; a single block runs without a loop."""
    if jax.tree_util.tree_leaves(xs)[0].shape[0] > 1:
        return jax.lax.scan(step, init, xs)
    carry, y = step(init, jax.tree_util.tree_map(lambda x: x[0], xs))
    return carry, jax.tree_util.tree_map(lambda t: t[None], y)


def _block_mask(q_pos, q_valid, kp, kv, causal, window, q_seg=None, ks=None):
    """``[b, 1, 1, q, block]`` visibility of one key block (``q_seg``/``ks``: segment ids, or None)."""
    qp = q_pos[:, :, None]
    kpb = kp[:, None, :]
    m = q_valid[:, :, None] & kv[:, None, :] & (jnp.abs(qp - kpb) < window)
    m = m & (~causal[:, None, None] | (kpb <= qp))
    if q_seg is not None:
        m = m & (q_seg[:, :, None] == ks[:, None, :])
    return m[:, None, None]


def _block_bias(*args):
    """``[b, 1, 1, q, block]`` float32 added to the scores: 0 where visible, ``_NEG`` where hidden.

    One add instead of selects on the scores and the probabilities (about a
    third faster on CPU, where those passes dominate attention's time).
    """
    return jnp.where(_block_mask(*args), 0.0, _NEG).astype(jnp.float32)


def _scores(qg, kb, scale, softcap):
    s = jnp.einsum("bhgqd,bkhd->bhgqk", qg, kb, preferred_element_type=jnp.float32) * scale
    if softcap is None:
        return s, None
    t = jnp.tanh(s / softcap)
    return softcap * t, t


def _group(q, kvh):
    b, tq, h, d = q.shape
    return jnp.moveaxis(q.reshape(b, tq, kvh, h // kvh, d), 1, 3)  # [b, kvh, g, tq, d]


def _seg_blocks(k_seg, block):
    """Key segment ids in blocks, or None (one segment per row)."""
    return None if k_seg is None else _blocks(k_seg, block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(11, 12, 13))
def _blocked(q, k, v, q_pos, k_pos, q_valid, k_valid, causal, window, q_seg, k_seg, scale, softcap, block):
    return _blocked_fwd(q, k, v, q_pos, k_pos, q_valid, k_valid, causal, window, q_seg, k_seg, scale, softcap,
                        block)[0]


def _blocked_fwd(q, k, v, q_pos, k_pos, q_valid, k_valid, causal, window, q_seg, k_seg, scale, softcap, block):
    b, tq, h, d = q.shape
    kvh = k.shape[2]
    qg = _group(q, kvh)

    def step(carry, xs):
        m, l, acc = carry
        kb, vb, kp, kv, ks = xs
        s, _ = _scores(qg, kb, scale, softcap)
        s = s + _block_bias(q_pos, q_valid, kp, kv, causal, window, q_seg, ks)
        m_new = jnp.maximum(m, s.max(-1))
        corr = jnp.exp(m - m_new)
        # A hidden key adds exp(_NEG - m_new) = 0 once the row has seen a key; what a row adds before that
        # is wiped by the correction (exp(_NEG - m_new) again) or, for rows that never see one, by `seen`.
        p = jnp.exp(s - m_new[..., None])
        acc = acc * corr[..., None] + jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(v.dtype), vb,
                                                 preferred_element_type=jnp.float32)
        return (m_new, l * corr + p.sum(-1), acc), None

    g = h // kvh
    init = (jnp.full((b, kvh, g, tq), _NEG, jnp.float32), jnp.zeros((b, kvh, g, tq), jnp.float32),
            jnp.zeros((b, kvh, g, tq, d), jnp.float32))
    (m, l, acc), _ = _scan_blocks(step, init, (_blocks(k, block), _blocks(v, block), _blocks(k_pos, block),
                                               _blocks(k_valid, block), _seg_blocks(k_seg, block)))
    seen = m > _NEG / 2  # the row saw a key
    outg = jnp.where(seen[..., None], acc / l[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(l), 0.0)
    out = jnp.moveaxis(outg, 3, 1).reshape(b, tq, h, d).astype(q.dtype)
    # Named for the ``projections`` rematerialisation policy (transformer.SAVED_NAMES): kept, not recomputed.
    out, lse = checkpoint_name(out, "attn_out"), checkpoint_name(lse, "attn_lse")
    return out, (q, k, v, q_pos, k_pos, q_valid, k_valid, causal, window, q_seg, k_seg, out, lse)


def _blocked_bwd(scale, softcap, block, res, dout):
    q, k, v, q_pos, k_pos, q_valid, k_valid, causal, window, q_seg, k_seg, out, lse = res
    b, tq, h, d = q.shape
    kvh = k.shape[2]
    qg = _group(q, kvh).astype(jnp.float32)
    dog = _group(dout, kvh).astype(jnp.float32)
    delta = jnp.sum(dog * _group(out, kvh).astype(jnp.float32), -1)  # [b, kvh, g, tq]

    def step(dq, xs):
        kb, vb, kp, kv, ks = xs
        s, t = _scores(qg, kb, scale, softcap)
        # Hidden keys (and rows that saw none, lse 0) get exp(_NEG - lse) = 0.
        p = jnp.exp(s + _block_bias(q_pos, q_valid, kp, kv, causal, window, q_seg, ks) - lse[..., None])
        dv = jnp.einsum("bhgqk,bhgqd->bkhd", p, dog)
        dp = jnp.einsum("bhgqd,bkhd->bhgqk", dog, vb.astype(jnp.float32))
        ds = p * (dp - delta[..., None])
        if softcap is not None:
            ds = ds * (1.0 - t * t)
        ds = ds * scale
        dq = dq + jnp.einsum("bhgqk,bkhd->bhgqd", ds, kb.astype(jnp.float32))
        dk = jnp.einsum("bhgqk,bhgqd->bkhd", ds, qg)
        return dq, (dk, dv)

    dq, (dk, dv) = _scan_blocks(step, jnp.zeros_like(qg), (_blocks(k, block), _blocks(v, block),
                                                           _blocks(k_pos, block), _blocks(k_valid, block),
                                                           _seg_blocks(k_seg, block)))
    unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, -1, kvh, d)  # noqa: E731
    dq = jnp.moveaxis(dq, 3, 1).reshape(b, tq, h, d).astype(q.dtype)
    return (dq, unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype), None, None, None, None, None, None,
            None, None)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)

"""Square Attack (Andriushchenko et al., ECCV 2020, arXiv 1912.00049): the reference's
``autoattack/square.py``. Random search on the margin ``z_y - max_{j != y} z_j`` with
forward passes only; inputs ``[B, H, W, C]``.

Linf: start from vertical stripes ``x +- eps`` (one sign per column and channel); each
query moves a random ``s x s`` window (``s^2 ~ p H W``, :func:`square_p_schedule`) by
``+-2 eps`` per channel, projected back onto the ball and ``[0, 1]``. L2: start from a grid
of ``H//5``-sized blocks of the pseudo-Gaussian pattern (:func:`square_eta`), and each
query moves the mass of a second random window into a first one, adds the pattern with
random signs there, and rescales the whole perturbation to norm ``eps`` (the reference's
update). A query is kept if it lowers the margin; a point stops once fooled.

Departures from the AutoAttack reference, deliberate: each example draws its own window
position, signs and (L2) pattern orientation (as in the original Square Attack code; the
AutoAttack reference shares one window per query across the batch); window positions are
uniform over all ``H - s + 1`` offsets (the reference never picks the last one); windows
are clamped to the image size for images smaller than the schedule assumes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from samrobust.attacks import LogitsFn, check_norm, cw_margin, example_keys, flat_norm, project
from samrobust.autoattack.base import Stage, State, bwhere, run

_P_THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_p_schedule(i: jax.Array | int, p_init: float = 0.8) -> jax.Array:
    """Fraction ``p`` of pixels changed at query ``i`` (Andriushchenko et al. 2020; halved
    after queries 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)."""
    halvings = jnp.sum(jnp.asarray(i) > jnp.asarray(_P_THRESHOLDS))
    return p_init / 2.0 ** halvings.astype(jnp.float32)


def _window_mask(h: int, w: int, vh: jax.Array, vw: jax.Array, s: jax.Array) -> jax.Array:
    """``[B, H, W, 1]`` mask of the ``s x s`` windows with top-left corners ``(vh, vw)``."""
    rows = jnp.arange(h)[None, :, None] - vh[:, None, None]
    cols = jnp.arange(w)[None, None, :] - vw[:, None, None]
    inside = (rows >= 0) & (rows < s) & (cols >= 0) & (cols < s)
    return inside[..., None]


def _rect_profile(di: jax.Array, dj: jax.Array, n: jax.Array, m: jax.Array, csum: jax.Array):
    """Reference ``eta_rectangles(n, m)`` (before normalisation) at local coordinates.

    Cell ``(i, j)`` of the ``n x m`` block gets ``sum_{k = dist}^{K-1} 1 / (k+1)^2``, with
    ``dist`` its Chebyshev distance to ``(n//2, m//2)`` and ``K = max(n, m) // 2 + 1``.
    """
    inside = (di >= 0) & (di < n) & (dj >= 0) & (dj < m)
    dist = jnp.maximum(jnp.abs(di - n // 2), jnp.abs(dj - m // 2))
    top = jnp.maximum(n // 2, m // 2) + 1
    val = jnp.take(csum, top, mode="clip") - jnp.take(csum, jnp.minimum(dist, top), mode="clip")
    return jnp.where(inside, val, 0.0)


def _eta_window(
    h: int, w: int, vh: jax.Array, vw: jax.Array, s: jax.Array, transpose: jax.Array
) -> jax.Array:
    """The L2 Square update's pattern (reference ``eta(s)``) in an ``s x s`` window at
    ``(vh, vw)``: two stacked blocks of concentric rectangles with opposite signs, unit L2
    norm, transposed where ``transpose``. Returns ``[B, H, W]`` (zero outside the window)."""
    csum = jnp.concatenate(
        [jnp.zeros(1), jnp.cumsum(1.0 / jnp.arange(1, max(h, w) + 2) ** 2)]
    ).astype(jnp.float32)
    di = jnp.arange(h)[None, :, None] - vh[:, None, None]
    dj = jnp.arange(w)[None, None, :] - vw[:, None, None]
    inside = (di >= 0) & (di < s) & (dj >= 0) & (dj < s)
    tr = transpose[:, None, None]
    di, dj = jnp.where(tr, dj, di), jnp.where(tr, di, dj)
    half = s // 2

    def unit(v):
        return v / (jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2), keepdims=True)) + 1e-12)

    top = unit(_rect_profile(di, dj, half, s, csum))
    bottom = unit(_rect_profile(di - half, dj, s - half, s, csum))
    return unit(jnp.where(inside, top - bottom, 0.0))


def square_eta(s: int) -> np.ndarray:
    """The reference ``eta(s)`` (untransposed) as a numpy ``s x s`` array: the pattern that
    :func:`_eta_window` draws in a window."""

    def rectangles(n, m):
        out = np.zeros((n, m))
        for k in range(max(n, m) // 2 + 1):
            r0, c0 = n // 2 - k, m // 2 - k
            out[max(r0, 0) : max(r0 + 2 * k + 1, 0), max(c0, 0) : max(c0 + 2 * k + 1, 0)] += (
                1.0 / (k + 1) ** 2
            )
        return out / (np.linalg.norm(out) + 1e-12)

    out = np.concatenate([rectangles(s // 2, s), -rectangles(s - s // 2, s)])
    return out / np.linalg.norm(out)


def _l2_init(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The L2 start (unnormalised): a grid of ``s x s`` blocks, ``s = H // 5``, each holding
    :func:`square_eta` (randomly transposed) times a random sign per channel."""
    b, h, w, c = shape
    s = max(h // 5, 1)
    oh, ow = max((h - 5 * s) // 2, 0), max((w - 5 * s) // 2, 0)  # grid offset
    nh, nw = (h - oh) // s, (w - ow) // s  # number of blocks that fit
    u = jax.vmap(lambda k: jax.random.uniform(k, (nh, nw, 1, 1, c + 1)))(keys)
    eta = jnp.asarray(square_eta(s), jnp.float32)
    pat = jnp.where(u[..., 0] < 0.5, eta.T, eta)[..., None]  # [b, nh, nw, s, s, 1]
    sign = jnp.where(u[..., 1:] < 0.5, 1.0, -1.0)
    blocks = (pat * sign).transpose(0, 1, 3, 2, 4, 5).reshape(b, nh * s, nw * s, c)
    return jnp.zeros(shape, jnp.float32).at[:, oh : oh + nh * s, ow : ow + nw * s].set(blocks)


def _margin(logits_fn: LogitsFn, x: jax.Array, y: jax.Array) -> jax.Array:
    return -cw_margin(logits_fn(x), y)  # > 0: correctly classified


def _signs(u: jax.Array) -> jax.Array:
    return jnp.where(u < 0.5, 1.0, -1.0)


def _init(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    keys: jax.Array,
    j: jax.Array,
    *,
    eps: float,
    norm: str,
) -> State:
    del j
    x = jax.lax.stop_gradient(x)
    b, h, w, c = x.shape
    k_init = jax.vmap(lambda k: jax.random.split(k)[0])(keys)  # queries: fold_in(k, i)
    if norm == "linf":
        u = jax.vmap(lambda k: jax.random.uniform(k, (1, w, c)))(k_init)
        x_best = jnp.clip(x + eps * _signs(u).astype(x.dtype), 0.0, 1.0)
    else:
        delta = _l2_init(k_init, x.shape)
        x_best = jnp.clip(x + eps * delta / (flat_norm(delta) + 1e-12), 0.0, 1.0)
    clean_ok = _margin(logits_fn, x, y) > 0
    m_best = jnp.where(clean_ok, _margin(logits_fn, x_best, y), -jnp.inf)
    return dict(
        x=x,
        y=y,
        key=jax.random.key_data(keys),
        adv=bwhere(clean_ok, x_best, x),
        margin=m_best,
        fooled=m_best <= 0,
    )


def _propose_linf(x, xb, u, s, eps):
    h, w = x.shape[1:3]
    s = jnp.clip(s, 1, min(h, w))
    v = _offsets(u[:, :2], s, (h, w))
    step = _window_mask(h, w, v[:, 0], v[:, 1], s) * (2.0 * eps) * _signs(u[:, None, None, 2:])
    return x + project(xb + step - x, x, eps, "linf")


def _propose_l2(x, xb, u, s, eps):
    h, w, c = x.shape[1:]
    s = jnp.maximum(s, 3)
    s = jnp.minimum(s + (1 - s % 2), min(h, w))  # odd, at most the image size
    v = _offsets(u[:, :4], s, (h, w, h, w))
    m1 = _window_mask(h, w, v[:, 0], v[:, 1], s).astype(x.dtype)
    m2 = _window_mask(h, w, v[:, 2], v[:, 3], s).astype(x.dtype)
    delta = xb - x
    norm_win1 = jnp.sqrt(jnp.sum(jnp.square(delta * m1), axis=(1, 2), keepdims=True))
    norm_img = flat_norm(delta)
    norm_wins = flat_norm(delta * jnp.maximum(m1, m2))
    pat = _eta_window(h, w, v[:, 0], v[:, 1], s, u[:, 4] < 0.5)
    new = pat[..., None] * _signs(u[:, None, None, 5:]) + delta * m1 / (1e-12 + norm_win1)
    new_norm = jnp.sqrt(jnp.sum(jnp.square(new), axis=(1, 2), keepdims=True))
    scale = jnp.sqrt(jnp.maximum(eps**2 - norm_img**2, 0.0) / c + norm_wins**2)
    new = new / (1e-12 + new_norm) * scale
    delta = delta * (1.0 - m2)
    delta = delta * (1.0 - m1) + new * m1
    return jnp.clip(x + eps * delta / (flat_norm(delta) + 1e-12), 0.0, 1.0)


def _offsets(u: jax.Array, s: jax.Array, sizes: tuple[int, ...]) -> jax.Array:
    """Uniform window corners in ``[0, n - s]`` from uniforms ``u``."""
    n = jnp.asarray(sizes)
    return jnp.minimum(jnp.floor(u * (n - s + 1)), n - s).astype(jnp.int32)


def _step(
    logits_fn: LogitsFn, st: State, i: jax.Array, *, eps: float, norm: str, p_init: float
) -> State:
    """Query ``i``: one proposal per point, kept where it lowers the margin of a point
    not yet fooled."""
    x, xb, mb = st["x"], st["adv"], st["margin"]
    h, w, c = x.shape[1:]
    keys = jax.random.wrap_key_data(st["key"])
    n_u = 2 + c if norm == "linf" else 5 + c
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, i), (n_u,)))(keys)
    s = jnp.round(jnp.sqrt(square_p_schedule(i, p_init) * h * w)).astype(jnp.int32)
    propose = _propose_linf if norm == "linf" else _propose_l2
    x_new = propose(x, xb, u, s, eps)
    m_new = _margin(logits_fn, x_new, st["y"])
    improved = (mb > 0) & (m_new < mb)
    margin = jnp.where(improved, m_new, mb)
    return dict(st, adv=bwhere(improved, x_new, xb), margin=margin, fooled=margin <= 0)


def stage(*, eps: float, norm: str, n_queries: int = 5000, p_init: float = 0.8) -> Stage:
    """Square as a cascade stage: one run of ``n_queries`` queries, checked for fooled
    points every 100 queries (a tenth of the budget if smaller)."""
    check_norm(norm)
    if eps < 0 or n_queries < 0:
        raise ValueError(f"square needs eps, n_queries >= 0; got {eps}, {n_queries}")
    return Stage(
        name="square",
        n_runs=1,
        n_steps=n_queries,
        init=functools.partial(_init, eps=eps, norm=norm),
        step=functools.partial(_step, eps=eps, norm=norm, p_init=p_init),
        segment=max(min(100, n_queries // 10), 1),
    )


def square_attack(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    norm: str = "linf",
    n_queries: int = 5000,
    p_init: float = 0.8,
    unroll: int = 1,
) -> jax.Array:
    """The stand-alone, jittable Square Attack: the lowest-margin point per example."""
    if x.ndim != 4:
        raise ValueError(f"square_attack needs NHWC images; got shape {x.shape}")
    st = stage(eps=eps, norm=norm, n_queries=n_queries, p_init=p_init)
    keys = example_keys(key, jnp.arange(x.shape[0]))
    return jax.lax.stop_gradient(run(st, logits_fn, x, y, keys, 0, unroll)["adv"])

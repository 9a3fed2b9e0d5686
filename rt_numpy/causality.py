"""A causality certificate for any attention or model: does the output at i depend on inputs after i?

A causal mask makes a later *key* invisible, but content-based selection can
still leak: a later token can change *which* earlier keys a query sees
(docs/algorithm.md#3-the-causal-leak, docs/algorithm.md#72-lsh-attention).
:func:`certify` tests the property itself.  For positions i it changes the
inputs after i and measures the largest change of the outputs at positions
<= i, in three ways:

* ``"token"`` - the input at i + 1 is replaced by a random one;
* ``"suffix"`` - every input after i is replaced by random ones;
* ``"evict"`` - the inputs after i become copies of earlier inputs (scaled by 2
  for vectors).  A copy scores as high as the token it copies against every
  centroid or hash, so it competes for the same cluster: this is the eviction
  that balanced top-W membership leaks through.

``fn`` is any callable from a NumPy array to a NumPy array, so a PyTorch or JAX
attention can be certified through a small wrapper that converts both ways.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from rt_numpy import _checks

PERTURBATIONS = ("token", "suffix", "evict")


@dataclasses.dataclass(frozen=True)
class Certificate:
    """What :func:`certify` found.

    Attributes
    ----------
    positions : ndarray (P,)
        The positions i that were tested.
    leak : dict
        ``{perturbation: ndarray (P,)}``: the largest absolute change of the
        outputs at positions <= i when the inputs after i changed.
    scale : float
        The largest absolute output of the unperturbed call.
    tol : float
        A position passes when its leak is at most ``tol * scale``.
    """

    positions: np.ndarray
    leak: dict
    scale: float
    tol: float

    @property
    def worst(self):
        """The largest leak over every position and perturbation, relative to ``scale``."""
        return max(float(v.max()) for v in self.leak.values()) / self.scale if self.scale else 0.0

    @property
    def passed(self):
        return self.worst <= self.tol

    def failing(self):
        """``[(perturbation, position, relative leak)]`` of every failing case, worst first."""
        cases = [(name, int(i), float(v) / self.scale) for name, values in self.leak.items()
                 for i, v in zip(self.positions, values) if float(v) > self.tol * self.scale]
        return sorted(cases, key=lambda c: -c[2])

    def __str__(self):
        verdict = "causal" if self.passed else "NOT causal"
        lines = [f"{verdict}: worst change at positions <= i is {self.worst:.3g} of the largest output "
                 f"|y| = {self.scale:.3g} (tolerance {self.tol:.1g})"]
        for name, values in self.leak.items():
            share = float(np.mean(values > self.tol * self.scale))
            lines.append(f"  {name:6s}: max {float(values.max()) / self.scale:.3g}, median "
                         f"{float(np.median(values)) / self.scale:.3g}, {share:.0%} of positions fail")
        return "\n".join(lines)


def certify(fn, x, *, rng, time_axis=1, positions=None, n_positions=16, perturbations=PERTURBATIONS,
            vocab_size=None, tol=None):
    """Test whether ``fn(x)`` at position i depends only on ``x`` at positions <= i.

    Parameters
    ----------
    fn : callable
        ``fn(x) -> y``, NumPy arrays, with the same length T as ``x`` along
        ``time_axis``.  It is called ``1 + P * len(perturbations)`` times.
    x : ndarray
        Float inputs (e.g. q of shape (B, H, T, D), ``time_axis=2``) or token
        ids (B, T) with ``vocab_size``.
    rng : numpy.random.Generator
        Draws the random replacements and the copied positions.
    time_axis : int
        The position axis of ``x`` and of ``fn(x)``.
    positions : sequence of int, optional
        Positions i to test, each in [0, T - 2].  By default ``n_positions``
        spread evenly over that range.
    perturbations : sequence of {"token", "suffix", "evict"}
    vocab_size : int, optional
        For integer ``x``: replacements are drawn from [0, vocab_size).
    tol : float, optional
        Allowed change relative to the largest output: 1e-10 for float64
        outputs, 1e-4 for float32 (a caller may reorder sums).

    Returns
    -------
    Certificate
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    _checks.generator("rng", rng)
    x = np.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"x must have a position axis, got a scalar of shape {x.shape}")
    axis = _checks.integer("time_axis", time_axis, -x.ndim, x.ndim - 1, what=f" (x has {x.ndim} axes)") % x.ndim
    T = x.shape[axis]
    if T < 2:
        raise ValueError(f"x must have at least 2 positions along time_axis={time_axis}, got {T}")
    is_ids = x.dtype.kind in "iu"
    if is_ids:
        vocab_size = _checks.integer("vocab_size", vocab_size, 1) if vocab_size is not None else None
        if vocab_size is None:
            raise ValueError("integer x (token ids) needs vocab_size, got None")
    elif x.dtype.kind != "f" or not np.all(np.isfinite(x)):
        raise ValueError(f"x must be finite floats or integer token ids, got dtype {x.dtype}"
                         + ("" if x.dtype.kind != "f" else " with non-finite values"))
    for name in perturbations:
        _checks.choice("perturbations", name, PERTURBATIONS)
    if positions is None:
        n = _checks.integer("n_positions", n_positions, 1)
        positions = np.unique(np.linspace(0, T - 2, min(n, T - 1)).round().astype(int))
    positions = np.asarray([_checks.integer("positions", int(i), 0, T - 2, what=f" (T={T})") for i in positions])

    xt = np.moveaxis(x, axis, 0)  # (T, ...): position first
    base = _call(fn, x, axis, T, "x")
    scale = float(np.abs(base).max())
    if tol is None:
        tol = 1e-4 if base.dtype == np.float32 else 1e-10
    tol = _checks.real("tol", tol, low=0.0)
    leak = {name: np.zeros(len(positions)) for name in perturbations}
    spread = float(xt.std()) if not is_ids else None
    for p, i in enumerate(positions):
        for name in perturbations:
            changed = xt.copy()
            if name == "evict":
                copies = rng.integers(0, i + 1, size=T - i - 1)  # earlier positions, one per later slot
                changed[i + 1:] = xt[copies] if is_ids else 2.0 * xt[copies]
            else:
                stop = i + 2 if name == "token" else T
                shape = changed[i + 1:stop].shape
                changed[i + 1:stop] = (rng.integers(0, vocab_size, size=shape) if is_ids
                                       else spread * rng.standard_normal(shape).astype(x.dtype))
            out = _call(fn, np.moveaxis(changed, 0, axis), axis, T, "x")
            diff = np.abs(np.moveaxis(out, axis, 0)[:i + 1] - np.moveaxis(base, axis, 0)[:i + 1])
            leak[name][p] = float(diff.max()) if np.all(np.isfinite(diff)) else np.inf
    return Certificate(positions=positions, leak=leak, scale=scale, tol=tol)


def _call(fn, x, axis, T, name):
    out = np.asarray(fn(x))
    if out.ndim <= axis or out.shape[axis] != T:
        raise ValueError(f"fn({name}) must return an array with T={T} positions along axis {axis}, "
                         f"got shape {out.shape}")
    if out.dtype.kind not in "fc":
        raise ValueError(f"fn({name}) must return floats, got dtype {out.dtype}")
    return out

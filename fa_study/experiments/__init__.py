"""The studies of the notebooks: a config in, tidy pandas DataFrames out.

Each study lives in its own module: a frozen dataclass config (:class:`core.Study`) whose
defaults carry a comment each and whose ``for_profile`` gives the ``quick`` / ``default`` /
``paper`` settings, ``specs()`` (its runs as :class:`fa_study.runs.RunSpec` s), a summary, its
figures and a ``*_view`` function that runs and draws -- what a notebook cell and a control
panel both call. Running, caching and dispatch live in :mod:`fa_study.runs` and
:mod:`fa_study.cache`.
"""
from .core import (Study, StudyResult, clear_cache, code_fingerprint, finished, last_epoch,  # noqa: F401
                   layer_long, profile_config, resolve_study, run_units)
from .ra_study import (RAStudy, ra_final, ra_summary, ra_view, run_ra, stability_figure,  # noqa: F401
                       stability_map, stability_tables)
from .audit import AuditStudy, audit_spec, audit_view, run_audit, verdict_table  # noqa: F401
from .feedback_tour import FeedbackTour, converter_demo, run_tour, tour_summary, tour_view  # noqa: F401
from .learned import LearnedStudy, learned_summary, learned_view, run_learned  # noqa: F401
from .penalty import PenaltyStudy, penalty_runs, penalty_summary, penalty_view, run_penalty  # noqa: F401
from .direction import (DirectionStudy, direction_readings, direction_summary, direction_view,  # noqa: F401
                        run_direction)
from .own_network import (OwnNetworkRuns, OwnNetworkStudy, build_network, own_network_view,  # noqa: F401
                          run_own_network, train_plain)

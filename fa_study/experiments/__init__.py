"""Entry points of the studies: a config in, a tidy pandas DataFrame out.

Each study lives in its own module: a frozen dataclass config whose defaults carry a comment
each and whose ``for_profile`` gives the ``quick`` / ``default`` / ``paper`` settings, a
``run_*`` function returning a tidy DataFrame (one row per arm, seed and epoch, every config
field and the ``data_source`` as columns), and a ``*_view`` function that runs it and draws
the study's figures and results table. The view is what a notebook cell and a widget panel
both call. Shared machinery (on-disk caching of every unit of work, joblib dispatch) is in
:mod:`fa_study.cache`, re-exported by :mod:`fa_study.experiments.core`; see their docstrings
for the cache's format and for running sweeps on a cluster.
"""
from .core import (CacheStats, StudyResult, clear_cache, code_fingerprint, config_columns,  # noqa: F401
                   profile_config, run_units, sources_note, spec_key)
from .ra_study import RAStudy, ra_summary, ra_view, run_ra  # noqa: F401
from .audit import AuditResults, AuditStudy, AuditUnit, audit_unit, run_audit, run_audit_units  # noqa: F401
from .feedback_tour import FeedbackTour, converter_demo, run_tour, tour_view  # noqa: F401
from .learned import LearnedStudy, learned_summary, learned_view, run_learned  # noqa: F401
from .penalty import PenaltyStudy, penalty_runs, penalty_summary, penalty_view, run_penalty  # noqa: F401
from .direction import DirectionStudy, direction_readings, direction_summary, direction_view, run_direction  # noqa: F401

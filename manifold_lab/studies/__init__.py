"""Controlled studies: tokenizer variants x seeds through train -> measure -> gFID, and their reports.

``studies/*.yaml`` declares a study (:mod:`.config`); each run's stages are content-addressed and
resumable (:mod:`.stages`); :mod:`.runner` executes runs and collects the tidy results;
:mod:`.executors` runs them locally, under torchrun or through submitit; :mod:`.stats` holds the
correlation statistics the reports (:mod:`manifold_lab.reports.study_report`) are drawn from.
"""

from manifold_lab.studies.config import STAGES, StudyConfig, StudyVariant, find_study, load_study

__all__ = ["STAGES", "StudyConfig", "StudyVariant", "find_study", "load_study"]

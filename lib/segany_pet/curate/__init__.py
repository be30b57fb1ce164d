"""Curating PETS-5k-like cohorts: several differently laid-out PET datasets into one tiered datastore.

`sources` reads the config and finds each source's cases; `importer` standardises, checks and imports them
over worker processes; `report` writes the QC report. ``segany-pet curate CONFIG DATASTORE`` runs all three.
"""

from segany_pet.curate.importer import CurationProblem, CurationRun, curate, prepare_case
from segany_pet.curate.sources import TARGETS, Case, Source, find_cases, load_config

__all__ = ["TARGETS", "Case", "CurationProblem", "CurationRun", "Source", "curate", "find_cases", "load_config",
           "prepare_case"]

"""The student side of OPD: rollout, methods, teacher clients, trainer, evaluation, pretraining."""

import common  # noqa: F401  (sets the OpenMP wait policy before torch loads; see there)

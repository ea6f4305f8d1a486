"""The student side of OPD: rollout, methods, teacher clients, trainer, evaluation, pretraining."""

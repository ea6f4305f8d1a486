"""Teacher and router services, their Ray Serve deployments, launchers and benchmarks."""

import common  # noqa: F401  (sets the OpenMP wait policy before torch loads; see there)

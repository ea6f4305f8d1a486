"""What every OPD process shares: the toy world, the velocity network, checkpoints, the wire codec.

Importing this package sets OpenMP's wait policy to passive before torch loads its OpenMP
runtime (so every ``opd`` process and test gets it; ``student`` and ``services`` import it
first). An active or default policy makes idle torch threads spin for a while before sleeping;
on a busy host a spinning thread holds a core that its descheduled sibling needs, and a short
training ran many times slower (docs/contention.md). An ``OMP_WAIT_POLICY`` already in the
environment wins; ``OPD_OMP_PASSIVE=0`` leaves OpenMP's own default (the bench's "before").
"""

import os

if "OMP_WAIT_POLICY" not in os.environ and os.environ.get("OPD_OMP_PASSIVE", "1") != "0":
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

"""What every OPD process shares: the toy world, the velocity network, checkpoints, the wire codec."""

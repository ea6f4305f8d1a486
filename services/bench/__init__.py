"""``opd bench``: load generation against OIP v2 endpoints and the physical limits to compare with."""

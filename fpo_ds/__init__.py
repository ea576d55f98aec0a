"""fpo-ds: FPO and DPO-family preference training on DeepSpeed.

Importing the package arms the parent-death signal of a rank started by a launcher
(fpo_ds.dist.die_with_launcher): it is the first thing a rank runs, before torch loads.
"""

from fpo_ds import dist as _dist

_dist.die_with_launcher()

"""Making a lease true on the GPU, in three tiers.

1. :mod:`chronos.enforce.caps`: cooperative caps (framework limits in the child's environment);
2. :mod:`chronos.enforce.watchdog`: NVML polling that ends a process tree over its cap or past its end;
3. :mod:`chronos.enforce.mps`: driver-enforced caps where an MPS control daemon runs.
"""

"""diffaccel.kernels: attention kernels on plain tensors.

Every kernel has a plain PyTorch reference beside it.  This package knows
tensors only: no diffusers, no validation of user input (that is
``diffaccel.ops``' job).  Tensors are ``[B, S, H, D]`` unless stated.
"""

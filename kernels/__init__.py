"""Triton kernels with plain-PyTorch references; installed as `sfd_scale.kernels`."""

"""Numerical operators shared by several architectures, in pure PyTorch."""

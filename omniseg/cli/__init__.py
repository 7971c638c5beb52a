"""The ``omniseg`` command line."""

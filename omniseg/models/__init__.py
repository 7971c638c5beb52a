"""Model architectures, each built from its config and loaded in the hub layout.

``omniseg.models.auto`` picks the architecture from a checkpoint's ``model_type``.
"""

"""Drop-in integrations with training libraries.

Each submodule imports its peer library when it is itself imported, never before: ``import alignops`` does not
import TRL. ``alignops.integrations.trl`` holds TRL's ``DPOTrainer``, ``GRPOTrainer`` and
``DistillationTrainer`` with their LM-head work done by alignops' fused kernels.
"""

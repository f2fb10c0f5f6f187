"""almt-pipeline: raw video clips to multimodal sentiment predictions with ALMT."""

__version__ = "0.1.0"

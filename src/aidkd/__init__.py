"""aidkd: Adaptive Instance Distillation for object detection."""
__version__ = "0.1.0"

"""SegAnyPET Label: promptable 3D segmentation of whole-body PET for MONAI Label."""

__version__ = "0.1.0"

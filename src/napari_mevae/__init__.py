"""napari-mevae: Multi-Encoder VAE features for single-cell images (library, CLI, napari plugin).

Importing the package is cheap: torch, umap and Qt are imported only by the modules that need
them, so napari starts fast.
"""

__version__ = "0.1.0"

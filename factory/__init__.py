"""factory: builds a matrix of bootable Linux disk images, concurrently."""

__version__ = "0.1.0"

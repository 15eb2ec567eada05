"""velocityfs: VM storage pools as a FUSE filesystem, with hierarchical quotas."""

__version__ = "0.1.0"

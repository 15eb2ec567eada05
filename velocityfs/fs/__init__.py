"""The FUSE adapter: pools as directories, media as files, on pyfuse3 and trio."""

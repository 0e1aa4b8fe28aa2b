"""The filesystem: inode table, the FUSE-free vfs, control, the pyfuse3 adapter, mounting."""

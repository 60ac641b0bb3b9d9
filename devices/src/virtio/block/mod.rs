//! virtio-blk backed by a host file.

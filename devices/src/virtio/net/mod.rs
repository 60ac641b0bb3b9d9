//! virtio-net backed by a TAP device.

//! virtio-mmio transport (virtio 1.x, 4.2).

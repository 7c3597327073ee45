//! virtio (todo)

//! Virtio rings (split and packed, device and driver side) over guest memory. Being written.

//! One driver-side interface over the two virtio-PCI register layouts of
//! `vdpakit_core::virtio_pci`: modern (virtio 1.x, capabilities) and legacy (0.9.5, the BAR0
//! block). The vDPA devices and the `fwd` port of the virtio, ifc and eni PMDs program a function
//! through this, so a ring, a doorbell or an interrupt vector is set up the same way whatever the
//! layout; what differs (legacy: fixed queue sizes, contiguous rings at a page frame number,
//! 32-bit features, no FEATURES_OK) is handled here.

use vdpakit_core::pci::{Doorbell, NotifyArea, PciDevice};
use vdpakit_core::virtio::features as vf;
use vdpakit_core::virtio_pci::{LegacyTransport, ModernTransport, legacy_layout, status};

use crate::error::{PmdError, Result};

/// Which layout a function speaks.
#[derive(Debug, Clone)]
pub enum Transport {
    /// virtio 1.x.
    Modern(ModernTransport),
    /// virtio 0.9.5 (legacy / transitional devices in legacy mode).
    Legacy(LegacyTransport),
}

/// Where one ring lives (IOVAs) and how it is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAddrs {
    /// Entries.
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Driver area (split: avail ring).
    pub driver: u64,
    /// Device area (split: used ring).
    pub device: u64,
}

/// Bounded number of queues a legacy function is scanned for.
const LEGACY_MAX_QUEUES: u16 = 64;

impl Transport {
    /// The function.
    pub fn pci(&self) -> &PciDevice {
        match self {
            Transport::Modern(t) => t.pci(),
            Transport::Legacy(t) => t.pci(),
        }
    }

    /// Device name.
    pub fn name(&self) -> &str {
        self.pci().name()
    }

    /// Whether this is the legacy layout.
    pub fn is_legacy(&self) -> bool {
        matches!(self, Transport::Legacy(_))
    }

    /// Resets the device (bounded wait for status 0).
    pub fn reset(&self) -> Result<()> {
        match self {
            Transport::Modern(t) => t.reset()?,
            Transport::Legacy(t) => t.reset()?,
        }
        Ok(())
    }

    /// Device status.
    pub fn status(&self) -> Result<u8> {
        Ok(match self {
            Transport::Modern(t) => t.status()?,
            Transport::Legacy(t) => t.status()?,
        })
    }

    /// ORs bits into the device status.
    pub fn add_status(&self, s: u8) -> Result<()> {
        let cur = self.status()?;
        match self {
            Transport::Modern(t) => t.set_status(cur | s)?,
            Transport::Legacy(t) => t.set_status(cur | s)?,
        }
        Ok(())
    }

    /// The device's feature bits (legacy: the 32 low bits).
    pub fn device_features(&self) -> Result<u64> {
        Ok(match self {
            Transport::Modern(t) => t.device_features()?,
            Transport::Legacy(t) => u64::from(t.device_features()?),
        })
    }

    /// Bus mastering on, reset, ACKNOWLEDGE | DRIVER, features = device's AND `wanted`
    /// (`required` must all be offered), FEATURES_OK checked (modern only: legacy has no such
    /// step). Returns the negotiated features.
    pub fn negotiate(&self, wanted: u64, required: u64) -> Result<u64> {
        // DMA needs bus mastering (VFIO leaves the command register as the kernel found it;
        // QEMU's modern virtio device DMAs through the bus-master address space).
        self.pci().enable_bus_master()?;
        match self {
            Transport::Modern(t) => Ok(t.negotiate(wanted, required)?),
            Transport::Legacy(t) => {
                t.reset()?;
                t.set_status(status::ACKNOWLEDGE)?;
                t.set_status(status::ACKNOWLEDGE | status::DRIVER)?;
                let dev_f = u64::from(t.device_features()?);
                if dev_f & required != required {
                    t.set_status(status::FAILED)?;
                    return Err(PmdError::Probe {
                        dev: self.name().to_string(),
                        what: format!(
                            "HOST_FEATURES (legacy BAR0 +0x00) reads {dev_f:#x}: required bits {:#x} are missing",
                            required & !dev_f
                        ),
                    });
                }
                let f = dev_f & wanted & 0xffff_ffff;
                t.set_driver_features(f as u32)?;
                Ok(f)
            }
        }
    }

    /// Queues the function has (legacy: queues with a non-zero size, scanned up to 64).
    pub fn num_queues(&self) -> Result<u16> {
        match self {
            Transport::Modern(t) => Ok(t.num_queues()?),
            Transport::Legacy(t) => {
                let mut n = 0;
                while n < LEGACY_MAX_QUEUES && t.queue_size(n)? != 0 {
                    n += 1;
                }
                Ok(n)
            }
        }
    }

    /// Largest size of queue `q` (legacy: the fixed size).
    pub fn queue_max_size(&self, q: u16) -> Result<u16> {
        Ok(match self {
            Transport::Modern(t) => t.queue_max_size(q)?,
            Transport::Legacy(t) => t.queue_size(q)?,
        })
    }

    /// Whether ring sizes are fixed by the device (legacy).
    pub fn fixed_queue_size(&self) -> bool {
        self.is_legacy()
    }

    /// Programs queue `q` (not enabled yet). Legacy: `size` must be the device's fixed size and
    /// the three areas must be in the contiguous legacy layout from a 4 KiB aligned `desc`
    /// (the device is told only the descriptor table's page frame number).
    pub fn setup_queue(&self, q: u16, r: &RingAddrs, vector: u16) -> Result<()> {
        match self {
            Transport::Modern(t) => {
                t.setup_queue(q, r.size, r.desc, r.driver, r.device, vector)?;
            }
            Transport::Legacy(t) => {
                let fixed = t.queue_size(q)?;
                if r.size != fixed {
                    return Err(PmdError::Config {
                        dev: self.name().to_string(),
                        what: format!(
                            "queue {q}: ring of {} entries, but QUEUE_NUM (legacy BAR0 +0x0c) fixes it at {fixed}",
                            r.size
                        ),
                    });
                }
                let (_, avail, used, _) = legacy_layout(fixed);
                if r.driver != r.desc + avail || r.device != r.desc + used {
                    return Err(PmdError::Config {
                        dev: self.name().to_string(),
                        what: format!(
                            "queue {q}: rings at desc {:#x} driver {:#x} device {:#x} are not in the contiguous legacy layout (driver area at desc + {avail:#x}, device area at desc + {used:#x})",
                            r.desc, r.driver, r.device
                        ),
                    });
                }
                t.set_queue_addr(q, r.desc)?;
            }
        }
        Ok(())
    }

    /// Enables (modern: queue_enable; legacy: the address written by setup already enables)
    /// or disables (legacy: page frame number 0; modern: refused, the spec has no per-queue
    /// stop without RING_RESET) queue `q`.
    pub fn enable_queue(&self, q: u16, on: bool) -> Result<()> {
        match (self, on) {
            (Transport::Modern(t), true) => t.enable_queue(q, true)?,
            (Transport::Modern(_), false) => {
                return Err(PmdError::Config {
                    dev: self.name().to_string(),
                    what: format!(
                        "queue {q}: a modern virtio function cannot stop one queue (queue_enable only takes 1)"
                    ),
                });
            }
            (Transport::Legacy(_), true) => {}
            (Transport::Legacy(t), false) => t.set_queue_addr(q, 0)?,
        }
        Ok(())
    }

    /// Sets every vector at once: config, then `(queue, vector)` pairs. Legacy: MSI-X must be
    /// enabled in the function first (the config moves to 0x18 from here on).
    pub fn set_vectors(&mut self, config: u16, queues: &[(u16, u16)]) -> Result<()> {
        match self {
            Transport::Modern(t) => {
                t.set_config_vector(config)?;
                for &(q, v) in queues {
                    t.set_queue_vector(q, v)?;
                }
            }
            Transport::Legacy(t) => t.set_vectors(Some(config), queues)?,
        }
        Ok(())
    }

    /// After MSI-X was disabled in the function: the legacy config goes back to 0x14.
    pub fn vectors_off(&mut self) {
        if let Transport::Legacy(t) = self {
            // `None` only flips the layout flag; it writes nothing.
            let _ = t.set_vectors(None, &[]);
        }
    }

    /// Queue `q`'s doorbell and the value to write (the queue index).
    pub fn doorbell(&self, q: u16) -> Result<(Doorbell, u32)> {
        Ok(match self {
            Transport::Modern(t) => (t.doorbell(q)?, u32::from(q)),
            Transport::Legacy(t) => (t.doorbell()?, u32::from(q)),
        })
    }

    /// A page another process can map as queue `q`'s doorbell (modern with a page-sized
    /// notify multiplier only).
    pub fn notify_area(&self, q: u16) -> Option<NotifyArea> {
        match self {
            Transport::Modern(t) => t.notify_area(q),
            Transport::Legacy(_) => None,
        }
    }

    /// Reads device configuration bytes (modern: generation-checked).
    pub fn read_config(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Transport::Modern(t) => t.read_device_config(offset, buf)?,
            Transport::Legacy(t) => t.read_device_config(offset, buf)?,
        }
        Ok(())
    }

    /// Sets DRIVER_OK.
    pub fn driver_ok(&self) -> Result<()> {
        self.add_status(status::DRIVER_OK)
    }

    /// Features a port or vDPA device cannot do without on this layout: VERSION_1 (modern).
    pub fn base_required(&self) -> u64 {
        match self {
            Transport::Modern(_) => vf::VERSION_1,
            Transport::Legacy(_) => 0,
        }
    }
}

/// The virtio-net configuration as far as the negotiated features make fields valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    /// MAC (with VIRTIO_NET_F_MAC; else None).
    pub mac: Option<[u8; 6]>,
    /// Link up (with VIRTIO_NET_F_STATUS; else assumed up).
    pub link_up: bool,
    /// max_virtqueue_pairs (with VIRTIO_NET_F_MQ; else 1).
    pub max_pairs: u16,
    /// MTU (with VIRTIO_NET_F_MTU).
    pub mtu: Option<u16>,
}

/// Reads the virtio-net configuration valid under `features`.
pub fn read_net_config(t: &Transport, features: u64) -> Result<NetConfig> {
    let mut b = [0u8; 12];
    let want = if features & vf::NET_MTU != 0 {
        12
    } else if features & (vf::NET_MQ | vf::NET_STATUS) != 0 {
        10
    } else if features & vf::NET_MAC != 0 {
        6
    } else {
        0
    };
    if want > 0 {
        t.read_config(0, &mut b[..want])?;
    }
    let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    Ok(NetConfig {
        mac: (features & vf::NET_MAC != 0).then(|| {
            let mut m = [0u8; 6];
            m.copy_from_slice(&b[..6]);
            m
        }),
        link_up: features & vf::NET_STATUS == 0 || u(6) & 1 != 0,
        max_pairs: if features & vf::NET_MQ != 0 {
            u(8).max(1)
        } else {
            1
        },
        mtu: (features & vf::NET_MTU != 0).then(|| u(10)),
    })
}

//! The e-switch: where each VF's wire goes.
//!
//! - `loop`: the VF's transmit comes back to its own receive (queue pair `p` to pair `p`).
//! - `cable`: two VFs of one device joined back to back (pair `p` of one to pair `p mod n` of
//!   the other). Both ends are served by the device's one engine thread, so a frame goes from
//!   one guest's transmit chain to the other's receive chain in the same burst.
//! - `tap:NAME`: a host TAP interface ([`Tap`]); transmit is written to it, frames read from it
//!   go to receive queue 0.
//! - `rep`: a representor port (`rep:dev=NAME,vf=N` in `vdpakit fwd`): what the VF transmits is
//!   what the port receives, what the port transmits the VF receives. Per queue pair three
//!   lock-free SPSC mbuf channels connect the engine thread with the port's queue: frames to the
//!   port, frames from the port, and blank mbufs the port supplies for the engine to fill (so
//!   the engine never allocates). Mbufs whose frame the engine delivered to the VF are kept as
//!   blanks too.
//!
//! A frame the wire cannot take (no receive buffer posted, a full channel, no blank mbuf, a TAP
//! that refuses it, no wire) is counted as dropped on the queue that lost it, never silently.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::ModelError;
use super::engine::{EngineShared, VfShared};
use super::tap::Tap;
use crate::mbuf::{MbufRx, MbufTx, mbuf_channel};

/// One VF's wire, as the engine runs it.
#[derive(Debug)]
pub enum Wire {
    /// Transmit comes back to receive; `Some(mac)`: only frames for that MAC (or broadcast,
    /// multicast).
    Loop(Option<[u8; 6]>),
    /// Joined to the VF with this index (same device).
    Cable(usize),
    /// A host TAP interface.
    Tap(Tap),
    /// A representor port (the channels arrive when a port attaches).
    Rep,
    /// Nothing: transmit is dropped.
    None,
}

impl Wire {
    /// A host TAP uplink (created, or attached to when it exists): errors name the interface
    /// and what to fix.
    pub fn tap(name: &str) -> Result<Wire, ModelError> {
        let tap = Tap::open(name).map_err(ModelError::Tap)?;
        tracing::info!("uplink is TAP {}", tap.name());
        Ok(Wire::Tap(tap))
    }
}

/// The engine's ends of one queue pair's representor channels.
pub struct RepQueueEnds {
    /// Frames the VF transmitted, to the port.
    pub(crate) to_port: MbufTx,
    /// Frames the port transmitted, for the VF to receive.
    pub(crate) from_port: MbufRx,
    /// Blank mbufs from the port, for frames to the port.
    pub(crate) blanks: MbufRx,
}

impl std::fmt::Debug for RepQueueEnds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepQueueEnds")
            .field("to_port", &self.to_port.len())
            .field("from_port", &self.from_port.len())
            .field("blanks", &self.blanks.len())
            .finish()
    }
}

/// The port's ends of one queue pair's representor channels.
pub struct RepPortEnds {
    /// Frames the VF transmitted.
    pub from_vf: MbufRx,
    /// Frames for the VF to receive.
    pub to_vf: MbufTx,
    /// Blank mbufs for the engine.
    pub blanks: MbufTx,
}

impl std::fmt::Debug for RepPortEnds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepPortEnds")
            .field("from_vf", &self.from_vf.len())
            .field("to_vf", &self.to_vf.len())
            .finish()
    }
}

/// The three channels of one queue pair, `capacity` entries each (a power of two).
pub fn rep_channels(capacity: usize) -> Result<(RepQueueEnds, RepPortEnds), ModelError> {
    let err = |e: crate::Error| ModelError::Rep(format!("representor channel: {e}"));
    let (to_port, from_vf) = mbuf_channel(capacity).map_err(err)?;
    let (to_vf, from_port) = mbuf_channel(capacity).map_err(err)?;
    let (blanks_tx, blanks_rx) = mbuf_channel(capacity).map_err(err)?;
    Ok((
        RepQueueEnds {
            to_port,
            from_port,
            blanks: blanks_rx,
        },
        RepPortEnds {
            from_vf,
            to_vf,
            blanks: blanks_tx,
        },
    ))
}

/// What a representor port holds while attached to a VF: detaches (the engine drops its ends)
/// when dropped.
#[derive(Debug)]
pub struct RepAttachment {
    engine: Arc<EngineShared>,
    vf: Arc<VfShared>,
    dev: String,
}

impl RepAttachment {
    pub(crate) fn attach(
        engine: Arc<EngineShared>,
        vf: Arc<VfShared>,
        dev: &str,
        ends: Vec<RepQueueEnds>,
    ) -> Result<RepAttachment, ModelError> {
        if vf.rep_taken.swap(true, Ordering::AcqRel) {
            return Err(ModelError::Rep(format!(
                "{dev} VF {}: its representor is already used by another port",
                vf.index
            )));
        }
        let a = RepAttachment {
            engine,
            vf,
            dev: dev.to_string(),
        };
        a.vf.ctl().rep = Some(ends);
        a.engine
            .sync(&a.vf)
            .map_err(|e| ModelError::Rep(format!("{dev}: {e}")))?;
        Ok(a)
    }

    /// Queue pairs of the VF.
    pub fn pairs(&self) -> u16 {
        self.vf.pairs
    }

    /// The VF's MAC.
    pub fn vf_mac(&self) -> [u8; 6] {
        self.vf.mac
    }

    /// Whether the VF's driver has it running (DRIVER_OK, not suspended).
    pub fn vf_running(&self) -> bool {
        let c = self.vf.ctl();
        c.running && !c.suspended
    }

    /// Wakes the engine if it sleeps (a port queued frames for the VF). One atomic load when
    /// it is awake.
    #[inline]
    pub fn wake(&self) {
        self.engine.wake();
    }
}

impl Drop for RepAttachment {
    fn drop(&mut self) {
        self.vf.ctl().rep = Some(Vec::new());
        if let Err(e) = self.engine.sync(&self.vf) {
            tracing::warn!("{}: representor detach: {e}", self.dev);
        }
        self.vf.rep_taken.store(false, Ordering::Release);
    }
}

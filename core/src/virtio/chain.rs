//! Chain building shared by both device-side ring formats.

use super::error::QueueError;
use super::mem::{GuestMemory, Segs, TableView};
use super::vring::VIRTQ_DESC_F_WRITE;
use super::{SEGS_MAX, vring};

/// The largest indirect table, in entries.
pub(crate) const MAX_INDIRECT: u32 = vring::MAX_QUEUE_SIZE as u32;

/// Running totals of one chain being popped (passed by value so it can live in registers).
#[derive(Clone, Copy)]
pub(crate) struct Acc {
    /// The head index / ring slot, for error messages.
    pub(crate) head: u16,
    pub(crate) readable: u32,
    pub(crate) writable: u32,
    seen_write: bool,
}

impl Acc {
    #[inline(always)]
    pub(crate) fn new(head: u16) -> Acc {
        Acc {
            head,
            readable: 0,
            writable: 0,
            seen_write: false,
        }
    }

    /// Adds one descriptor's buffer: ordering check, byte totals, translation into `segs`.
    /// Zero-length buffers are accepted and produce no segment.
    #[inline(always)]
    pub(crate) fn add(
        &mut self,
        mem: &GuestMemory,
        segs: &mut Segs,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
    ) -> Result<(), QueueError> {
        let write = flags & VIRTQ_DESC_F_WRITE != 0;
        // Each total is updated by name, not through a `&mut` chosen at run time: that would pin
        // the accumulator to the stack, and reading both totals back as one word after two
        // narrow stores defeats store-to-load forwarding (a stall of tens of cycles per chain).
        if write {
            self.seen_write = true;
            self.writable = self
                .writable
                .checked_add(len)
                .ok_or(QueueError::ChainBytesOverflow { head: self.head })?;
        } else {
            if self.seen_write {
                return Err(QueueError::ReadableAfterWritable { index });
            }
            self.readable = self
                .readable
                .checked_add(len)
                .ok_or(QueueError::ChainBytesOverflow { head: self.head })?;
        }
        if len == 0 {
            return Ok(());
        }
        match mem.push_buffer(segs, addr, len, write) {
            Ok(()) => Ok(()),
            Err(true) => Err(QueueError::BadBuffer { addr, len, write }),
            Err(false) => Err(QueueError::TooManySegs {
                head: self.head,
                max: SEGS_MAX,
            }),
        }
    }
}

/// Checks an indirect descriptor's table (length a non-zero multiple of 16, at most 32768
/// entries, all in one region of guest memory) and returns its entry count and a view of it.
#[inline(always)]
pub(crate) fn indirect_table(
    mem: &GuestMemory,
    addr: u64,
    len: u32,
) -> Result<(u32, TableView<'_>), QueueError> {
    let count = indirect_entries(addr, len)?;
    let table = mem
        .table(addr, len)
        .ok_or(QueueError::IndirectTableNotInMemory { addr, len })?;
    Ok((count, table))
}

/// Checks an indirect descriptor's table length (non-zero multiple of 16, at most 32768
/// entries) and returns its entry count.
#[inline(always)]
fn indirect_entries(addr: u64, len: u32) -> Result<u32, QueueError> {
    if len == 0 || !len.is_multiple_of(16) || len / 16 > MAX_INDIRECT {
        return Err(QueueError::IndirectTableLen { addr, len });
    }
    Ok(len / 16)
}

//! Receive steering: an RQT listing the receive queues, a TIR hashing over it (symmetric
//! Toeplitz over IPv4/IPv6 addresses and L4 ports), and the NIC receive root flow table with two
//! rules sending frames to the TIR: destination MAC = the device's MAC, and the multicast bit
//! (broadcast included); promiscuous adds a third, in a group that matches no bits (every
//! frame).

use crate::error::Result;
use crate::hca::{Hca, cmd_in};
use crate::prm::{op, steer};

/// The Toeplitz key (40 bytes, vdpakit's own).
pub const RSS_KEY: [u8; 40] = [
    0x2c, 0xc6, 0x81, 0xd1, 0x5b, 0xdb, 0xf4, 0xf7, 0xfc, 0xa2, 0x83, 0x19, 0xdb, 0x1a, 0x3e, 0x94,
    0x6b, 0x9e, 0x38, 0xd9, 0x2c, 0x9c, 0x03, 0xd1, 0xad, 0x99, 0x44, 0xa7, 0xd9, 0x56, 0x3d, 0x59,
    0x06, 0x3c, 0x25, 0xf3, 0xfc, 0x1f, 0xdc, 0x2a,
];

impl Hca {
    /// CREATE_RQT over receive queue objects `vqs` (room for `max` entries).
    pub fn create_rqt(&self, vqs: &[u32], max: u16) -> Result<u32> {
        let mut b = cmd_in(op::CREATE_RQT, 0, steer::RQT_ENTRIES + 4 * usize::from(max));
        b.set(steer::RQT_LIST_Q_TYPE, steer::RQT_LIST_VIRTIO_NET_Q);
        b.set(steer::RQT_MAX_SIZE, u64::from(max));
        b.set(steer::RQT_ACTUAL_SIZE, vqs.len() as u64);
        for (i, &id) in vqs.iter().enumerate() {
            b.put_be32(steer::RQT_ENTRIES + 4 * i, id);
        }
        self.exec_id(&b)
    }

    /// MODIFY_RQT: replaces the entry list.
    pub fn modify_rqt(&self, rqt: u32, vqs: &[u32], max: u16) -> Result<()> {
        let mut b = cmd_in(op::MODIFY_RQT, 0, steer::RQT_ENTRIES + 4 * usize::from(max));
        b.set(steer::RQT_MODIFY_RQTN, u64::from(rqt));
        b.set(steer::RQT_MODIFY_BITMASK, 1);
        b.set(steer::RQT_LIST_Q_TYPE, steer::RQT_LIST_VIRTIO_NET_Q);
        b.set(steer::RQT_MAX_SIZE, u64::from(max));
        b.set(steer::RQT_ACTUAL_SIZE, vqs.len() as u64);
        for (i, &id) in vqs.iter().enumerate() {
            b.put_be32(steer::RQT_ENTRIES + 4 * i, id);
        }
        self.exec(&b, 16).map(|_| ())
    }

    /// DESTROY_RQT.
    pub fn destroy_rqt(&self, rqt: u32) -> Result<()> {
        self.exec_destroy(op::DESTROY_RQT, rqt)
    }

    /// CREATE_TIR: indirect over `rqt`, symmetric Toeplitz over addresses and ports.
    pub fn create_tir(&self, td: u32, rqt: u32) -> Result<u32> {
        let mut b = cmd_in(op::CREATE_TIR, 0, steer::TIR_LEN);
        b.set(steer::TIR_DISP_TYPE, 1);
        b.set(steer::TIR_HASH_SYMMETRIC, 1);
        b.set(steer::TIR_INDIRECT_TABLE, u64::from(rqt));
        b.set(steer::TIR_HASH_FN, 2);
        b.set(steer::TIR_TD, u64::from(td));
        b.put(steer::TIR_KEY, &RSS_KEY);
        b.set(steer::TIR_HASH_FIELDS_OUTER, steer::HASH_IP_PORTS);
        self.exec_id(&b)
    }

    /// DESTROY_TIR.
    pub fn destroy_tir(&self, tir: u32) -> Result<()> {
        self.exec_destroy(op::DESTROY_TIR, tir)
    }

    /// CREATE_FLOW_TABLE (NIC receive) with 2^`log_size` entries.
    pub fn create_flow_table(&self, level: u8, log_size: u8) -> Result<u32> {
        let mut b = cmd_in(op::CREATE_FLOW_TABLE, 0, steer::FT_LEN);
        b.set(steer::FT_TABLE_TYPE, steer::TABLE_NIC_RX);
        b.set(steer::FT_LEVEL, u64::from(level));
        b.set(steer::FT_LOG_SIZE, u64::from(log_size));
        self.exec_id(&b)
    }

    /// SET_FLOW_TABLE_ROOT (NIC receive).
    pub fn set_flow_table_root(&self, table: u32) -> Result<()> {
        let mut b = cmd_in(op::SET_FLOW_TABLE_ROOT, 0, steer::FT_LEN);
        b.set(steer::FT_TABLE_TYPE, steer::TABLE_NIC_RX);
        b.set(steer::FT_TABLE_ID, u64::from(table));
        self.exec(&b, 16).map(|_| ())
    }

    /// DESTROY_FLOW_TABLE.
    pub fn destroy_flow_table(&self, table: u32) -> Result<()> {
        let mut b = cmd_in(op::DESTROY_FLOW_TABLE, 0, steer::FT_LEN);
        b.set(steer::FT_TABLE_TYPE, steer::TABLE_NIC_RX);
        b.set(steer::FT_TABLE_ID, u64::from(table));
        self.exec(&b, 16).map(|_| ())
    }

    /// CREATE_FLOW_GROUP over entries `start..=end` matching the outer destination MAC under
    /// `mask`.
    pub fn create_dmac_group(
        &self,
        table: u32,
        start: u32,
        end: u32,
        mask: [u8; 6],
    ) -> Result<u32> {
        let mut b = cmd_in(op::CREATE_FLOW_GROUP, 0, steer::FG_LEN);
        b.set(steer::FT_TABLE_TYPE, steer::TABLE_NIC_RX);
        b.set(steer::FT_TABLE_ID, u64::from(table));
        b.set(steer::FG_START, u64::from(start));
        b.set(steer::FG_END, u64::from(end));
        b.set(steer::FG_CRITERIA_ENABLE, 1);
        put_dmac(&mut b, steer::FG_CRITERIA, mask);
        self.exec_id(&b)
    }

    /// DESTROY_FLOW_GROUP.
    pub fn destroy_flow_group(&self, table: u32, group: u32) -> Result<()> {
        let mut b = cmd_in(op::DESTROY_FLOW_GROUP, 0, steer::FT_LEN);
        b.set(steer::FT_TABLE_TYPE, steer::TABLE_NIC_RX);
        b.set(steer::FT_TABLE_ID, u64::from(table));
        b.set(steer::FG_GROUP_ID, u64::from(group));
        self.exec(&b, 16).map(|_| ())
    }

    /// SET_FLOW_TABLE_ENTRY: frames whose destination MAC matches `dmac` (under the group's
    /// mask) go to `tir`.
    pub fn set_dmac_entry(
        &self,
        table: u32,
        group: u32,
        index: u32,
        dmac: [u8; 6],
        tir: u32,
    ) -> Result<()> {
        let mut b = cmd_in(op::SET_FLOW_TABLE_ENTRY, 0, steer::FTE_LEN);
        b.set(steer::FT_TABLE_TYPE, steer::TABLE_NIC_RX);
        b.set(steer::FT_TABLE_ID, u64::from(table));
        b.set(steer::FTE_INDEX, u64::from(index));
        b.set(steer::FTE_GROUP_ID, u64::from(group));
        b.set(steer::FTE_ACTION, steer::ACTION_FWD_DEST);
        b.set(steer::FTE_DEST_COUNT, 1);
        put_dmac(&mut b, steer::FTE_MATCH, dmac);
        b.set(steer::FTE_DEST_TYPE, steer::DEST_TIR);
        b.set(steer::FTE_DEST_ID, u64::from(tir));
        self.exec(&b, 16).map(|_| ())
    }

    /// DELETE_FLOW_TABLE_ENTRY.
    pub fn delete_entry(&self, table: u32, index: u32) -> Result<()> {
        let mut b = cmd_in(op::DELETE_FLOW_TABLE_ENTRY, 0, steer::FT_LEN.max(0x44));
        b.set(steer::FT_TABLE_TYPE, steer::TABLE_NIC_RX);
        b.set(steer::FT_TABLE_ID, u64::from(table));
        b.set(steer::FTE_INDEX, u64::from(index));
        self.exec(&b, 16).map(|_| ())
    }
}

fn put_dmac(b: &mut crate::prm::Buf, at: usize, mac: [u8; 6]) {
    b.put(at + steer::MATCH_DMAC_47_16, &mac[..4]);
    b.put(at + steer::MATCH_DMAC_15_0, &mac[4..]);
}

/// The steering objects of one device.
#[derive(Debug, Default)]
pub struct Steering {
    /// RQT.
    pub rqt: u32,
    /// Room in the RQT.
    pub rqt_max: u16,
    /// TIR.
    pub tir: u32,
    /// Root flow table.
    pub table: u32,
    /// Flow groups (unicast, multicast).
    pub groups: Vec<u32>,
    /// Flow entries in use.
    pub entries: Vec<u32>,
}

impl Steering {
    /// RQT over `rx` (receive queue object ids), TIR, root table, groups and rules for `mac`.
    /// On failure what was created is destroyed.
    pub fn create(
        hca: &Hca,
        td: u32,
        rx: &[u32],
        max_pairs: u16,
        mac: [u8; 6],
        promisc: bool,
    ) -> Result<Steering> {
        let mut s = Steering {
            rqt_max: max_pairs.next_power_of_two(),
            ..Default::default()
        };
        let r = (|| {
            s.rqt = hca.create_rqt(rx, s.rqt_max)?;
            s.tir = hca.create_tir(td, s.rqt)?;
            s.table = hca.create_flow_table(0, 2)?;
            let uc = hca.create_dmac_group(s.table, 0, 0, [0xff; 6])?;
            s.groups.push(uc);
            let mc = hca.create_dmac_group(s.table, 1, 1, [1, 0, 0, 0, 0, 0])?;
            s.groups.push(mc);
            hca.set_dmac_entry(s.table, uc, 0, mac, s.tir)?;
            s.entries.push(0);
            hca.set_dmac_entry(s.table, mc, 1, [1, 0, 0, 0, 0, 0], s.tir)?;
            s.entries.push(1);
            if promisc {
                // Promiscuous: a group matching no bits, so its entry takes every frame.
                let all = hca.create_dmac_group(s.table, 2, 2, [0; 6])?;
                s.groups.push(all);
                hca.set_dmac_entry(s.table, all, 2, [0; 6], s.tir)?;
                s.entries.push(2);
            }
            hca.set_flow_table_root(s.table)
        })();
        match r {
            Ok(()) => Ok(s),
            Err(e) => {
                s.destroy(hca);
                Err(e)
            }
        }
    }

    /// Points the RQT at another set of receive queues (queue pairs changed).
    pub fn set_queues(&self, hca: &Hca, rx: &[u32]) -> Result<()> {
        hca.modify_rqt(self.rqt, rx, self.rqt_max)
    }

    /// Destroys everything in reverse order; failures are logged.
    pub fn destroy(&mut self, hca: &Hca) {
        let log = |r: Result<()>| {
            if let Err(e) = r {
                tracing::warn!("{e}");
            }
        };
        for i in self.entries.drain(..).rev() {
            log(hca.delete_entry(self.table, i));
        }
        for g in self.groups.drain(..).rev() {
            log(hca.destroy_flow_group(self.table, g));
        }
        if self.table != 0 {
            log(hca.destroy_flow_table(self.table));
            self.table = 0;
        }
        if self.tir != 0 {
            log(hca.destroy_tir(self.tir));
            self.tir = 0;
        }
        if self.rqt != 0 {
            log(hca.destroy_rqt(self.rqt));
            self.rqt = 0;
        }
    }
}

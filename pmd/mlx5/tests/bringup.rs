//! Function bring-up and teardown against the model: repeated without leaks, bounded waits,
//! health, checksum mode, and a driver against a model with one layout field moved.

mod common;

use std::time::Duration;

use common::*;
use vdpakit_core::vdpa::VdpaDevice;
use vdpakit_pmd_mlx5::cmd::CmdOptions;
use vdpakit_pmd_mlx5::error::Error;
use vdpakit_pmd_mlx5::model::{ModelOptions, Skew};
use vdpakit_pmd_mlx5::prm::op;
use vdpakit_pmd_mlx5::{Devargs, Hca, HcaOptions, Mlx5Vdpa};

fn quick(cmd_ms: u64) -> HcaOptions {
    HcaOptions {
        cmd: CmdOptions {
            timeout: Duration::from_millis(cmd_ms),
            checksum: false,
        },
        init_timeout: Duration::from_millis(200),
        ..hca_opts()
    }
}

#[test]
fn bring_up_reports_caps_and_gives_pages() {
    let (m, mut hca) = hca(ModelOptions::default());
    assert!(m.is_initialized());
    let c = hca.caps();
    assert_eq!(c.virtio.max_queues, 16);
    assert_eq!(c.virtio.event_modes, 0x7);
    assert_eq!(c.virtio.doorbell_offset, 0x8000);
    assert_eq!(c.virtio.umem, [(128, 4096), (64, 4096), (0, 4096)]);
    assert!(c.virtio.freeze_to_rdy && c.virtio.modify_ext);
    assert!(c.general.umem_uid_0 && c.general.nic_flow_table);
    assert_eq!(c.general.general_obj_types, (1 << 0xd) | (1 << 0x1c));
    assert_eq!((hca.firmware_pages(), m.firmware_pages()), (32, 32));
    let pages_in_use = hca.arena().used_pages();
    hca.close().unwrap();
    assert!(!m.is_initialized());
    assert_eq!(m.live_objects(), 0);
    assert_eq!(hca.firmware_pages(), 0);
    assert_eq!(
        hca.arena().used_pages(),
        pages_in_use - 32,
        "pages came back to the driver"
    );
    // Idempotent.
    hca.close().unwrap();
}

/// 100 bring-ups and teardowns of one function, each with the device's base resources made
/// and freed: nothing leaks (the model counts live objects and pages).
#[test]
fn hundred_bring_ups_leak_nothing() {
    let (m, pci, _) = open_model(ModelOptions::default());
    for i in 0..100 {
        let mut hca = Hca::open(pci.clone(), &hca_opts()).unwrap();
        let uar = hca.alloc_uar().unwrap();
        let pd = hca.alloc_pd().unwrap();
        let td = hca.alloc_td().unwrap();
        let tis = hca.create_tis(td).unwrap();
        assert_eq!(m.live_objects(), 4 + 32, "round {i}");
        hca.destroy_tis(tis).unwrap();
        hca.dealloc_td(td).unwrap();
        hca.dealloc_pd(pd).unwrap();
        hca.dealloc_uar(uar).unwrap();
        hca.close().unwrap();
        assert_eq!(m.live_objects(), 0, "round {i}");
    }
    let s = m.stats();
    assert_eq!((s.leaked_objects, s.leaked_pages, s.failed), (0, 0, 0));
}

/// 100 configure/close cycles of a device (every queue object, UMEM, key and steering object
/// made and destroyed each time) leave only the device's base resources.
#[test]
fn hundred_queue_bring_ups_leak_nothing() {
    let (mut dev, m) = device("model,queues=2");
    let g = Guest::new(dev.domain());
    let f = features(false);
    let rings: Vec<Ring> = (0..4).map(|i| Ring::new(&g, i, 256, f, true)).collect();
    let refs: Vec<&Ring> = rings.iter().collect();
    let base = m.live_objects();
    for _ in 0..100 {
        dev.configure(&conf(f, &refs)).unwrap();
        assert!(m.live_objects() > base + 20);
        dev.close().unwrap();
        assert_eq!(m.live_objects(), base);
    }
    drop(dev);
    assert_eq!(m.live_objects(), 0);
    assert_eq!(m.stats().leaked_objects, 0);
}

/// The same in QP event mode: each cycle also makes and destroys the EQ and, per queue, a CQ,
/// two QPs and their connection; nothing is left behind.
#[test]
fn hundred_qp_mode_bring_ups_leak_nothing() {
    use vdpakit_pmd_mlx5::model::Kind;
    let (mut dev, m) = device("model,queues=2,event_mode=qp");
    let g = Guest::new(dev.domain());
    let f = features(false);
    let rings: Vec<Ring> = (0..4).map(|i| Ring::new(&g, i, 256, f, true)).collect();
    let refs: Vec<&Ring> = rings.iter().collect();
    let base = m.live_objects();
    let pages = dev.hca().arena().used_pages();
    for i in 0..100 {
        dev.configure(&conf(f, &refs)).unwrap();
        let c = m.census();
        assert_eq!(
            (c[&Kind::Eq], c[&Kind::Cq], c[&Kind::Qp], c[&Kind::Vq]),
            (1, 4, 8, 4),
            "round {i}"
        );
        dev.close().unwrap();
        assert_eq!(m.live_objects(), base, "round {i}: {:?}", m.census());
        assert_eq!(
            dev.hca().arena().used_pages(),
            pages,
            "round {i}: driver memory"
        );
    }
    drop(dev);
    assert_eq!(m.live_objects(), 0);
    let s = m.stats();
    assert_eq!((s.leaked_objects, s.failed, s.bad_doorbells), (0, 0, 0));
}

#[test]
fn initializing_bit_wait_is_bounded() {
    let (_m, pci, _) = open_model(ModelOptions {
        init_delay_reads: u32::MAX,
        ..ModelOptions::default()
    });
    let e = Hca::open(pci, &quick(100)).unwrap_err();
    assert!(matches!(e, Error::Timeout { ms: 200, .. }), "{e}");
    assert!(
        e.to_string().contains(
            "firmware initialization before command queue set-up (initializing bit still set)"
        ),
        "{e}"
    );
}

/// A firmware that stops completing commands: the wait is bounded, the error names the
/// command, and the queue refuses later commands instead of reusing a slot the device owns.
#[test]
fn hung_command_times_out_naming_it() {
    let (m, pci, _) = open_model(ModelOptions::default());
    let hca = Hca::open(pci, &quick(100)).unwrap();
    m.hang_commands(true);
    let e = hca.alloc_pd().unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: completion of ALLOC_PD [opcode 0x0800] (ownership bit still set) did not happen within 100 ms",
            hca.name()
        )
    );
    m.hang_commands(false);
    let e = hca.alloc_uar().unwrap_err().to_string();
    assert!(
        e.contains("ALLOC_UAR") && e.contains("unusable since ALLOC_PD [opcode 0x0800] timed out"),
        "{e}"
    );
}

#[test]
fn health_checks() {
    let (m, hca) = hca(ModelOptions::default());
    let h = hca.check_health().unwrap();
    assert_eq!((h.synd, h.nic_interface), (0, 0));
    m.set_health_syndrome(0x10, 0x1234);
    let e = hca.check_health().unwrap_err().to_string();
    assert!(
        e.ends_with("firmware unhealthy: health syndrome 0x10, extended syndrome 0x1234"),
        "{e}"
    );
    m.set_health_syndrome(0, 0);
    m.freeze_health_counter(true);
    let mut last = Ok(h);
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(3));
        last = hca.check_health();
    }
    let e = last.unwrap_err().to_string();
    assert!(e.contains("health counter stuck"), "{e}");
    m.freeze_health_counter(false);
    std::thread::sleep(Duration::from_millis(3));
    hca.check_health().unwrap();
}

/// Checksum mode: a model that checks signatures refuses unsigned commands (delivery status
/// 1, naming the first command), and accepts a driver that signs.
#[test]
fn checksum_mode() {
    let o = || ModelOptions {
        verify_signatures: true,
        ..ModelOptions::default()
    };
    let (_m, pci, _) = open_model(o());
    let e = Hca::open(pci, &hca_opts()).unwrap_err();
    assert_eq!(e.delivery(), Some(1));
    assert_eq!(e.opcode(), Some(op::ENABLE_HCA));
    assert!(
        e.to_string()
            .contains("ENABLE_HCA [opcode 0x0104] was not delivered: bad signature"),
        "{e}"
    );

    let (m, pci, _) = open_model(o());
    let mut opts = hca_opts();
    opts.cmd.checksum = true;
    let hca = Hca::open(pci, &opts).unwrap();
    assert_eq!(hca.caps().general.cmdif_checksum, 1);
    let pd = hca.alloc_pd().unwrap();
    hca.dealloc_pd(pd).unwrap();
    assert_eq!(m.stats().failed, 0);
}

/// A model whose command doorbell is 4 bytes off: the first command never completes.
#[test]
fn moved_doorbell_register_fails_loudly() {
    let (_m, pci, _) = open_model(ModelOptions {
        skew: Some(Skew::CmdDoorbell),
        ..ModelOptions::default()
    });
    let e = Hca::open(pci, &quick(100)).unwrap_err().to_string();
    assert!(
        e.contains("completion of ENABLE_HCA [opcode 0x0104]"),
        "{e}"
    );
}

/// A model returning allocated ids one byte early: the driver's ids are wrong and the first
/// command that uses one is refused, naming it.
#[test]
fn moved_id_field_fails_loudly() {
    let (_m, pci, _) = open_model(ModelOptions {
        skew: Some(Skew::AllocId),
        ..ModelOptions::default()
    });
    let mut a = Devargs::parse("model").unwrap();
    a.dma_mem = 4 << 20;
    a.mem = vdpakit_core::mem::MemMode::NoHuge;
    let e = Mlx5Vdpa::open(pci, a).unwrap_err();
    assert_eq!(e.status(), Some(5), "{e}");
    assert!(
        e.to_string()
            .contains("CREATE_TIS [opcode 0x0912] failed: bad resource"),
        "{e}"
    );
}

/// A model reading the queue size 16 bits late: queue creation is refused as a bad parameter.
#[test]
fn moved_queue_size_field_fails_loudly() {
    let (_m, pci, _) = open_model(ModelOptions {
        skew: Some(Skew::VqQueueSize),
        ..ModelOptions::default()
    });
    let mut a = Devargs::parse("model").unwrap();
    a.dma_mem = 4 << 20;
    a.mem = vdpakit_core::mem::MemMode::NoHuge;
    let mut dev = Mlx5Vdpa::open(pci, a).unwrap();
    let g = Guest::new(dev.domain());
    let f = features(false);
    let rx = Ring::new(&g, 0, 64, f, false);
    let e = dev.configure(&conf(f, &[&rx])).unwrap_err().to_string();
    assert!(
        e.contains("CREATE_GENERAL_OBJECT(VIRTIO_NET_Q) [opcode 0x0a00] failed: bad parameter"),
        "{e}"
    );
}

/// A model writing the completion EQE's cqn 4 bytes late: the driver's event thread finds no
/// CQ of that number and counts an error; the queue's notification reaches no call eventfd.
#[test]
fn moved_eqe_field_fails_loudly() {
    let (m, pci, _) = open_model(ModelOptions {
        skew: Some(Skew::EqeCqn),
        ..ModelOptions::default()
    });
    let mut a = Devargs::parse("model,event_mode=qp").unwrap();
    a.dma_mem = 4 << 20;
    a.mem = vdpakit_core::mem::MemMode::NoHuge;
    let mut dev = Mlx5Vdpa::open(pci, a).unwrap();
    let g = Guest::new(dev.domain());
    let f = features(false);
    let mut rx = Ring::new(&g, 0, 64, f, true);
    let mut tx = Ring::new(&g, 1, 64, f, true);
    dev.configure(&conf(f, &[&rx, &tx])).unwrap();
    rx.post_rx(&dev, 64);
    let mac = dev.net_config().mac;
    assert_eq!(tx.transmit(&g, &dev, &[frame(mac, 1, 1, 60)], 12), 1);
    wait("the event thread to notice", || {
        (dev.event_stats().unwrap().errors > 0).then_some(())
    });
    std::thread::sleep(Duration::from_millis(30));
    assert!(m.notifies(1) > 0 && m.stats().eqes > 0);
    assert_eq!(dev.event_stats().unwrap().signals, 0);
    assert_eq!(rx.interrupts() + tx.interrupts(), 0);
}

/// A function left enabled by a previous user (a process that died without teardown): the
/// next bring-up resets it and succeeds.
#[test]
fn left_enabled_function_is_reset() {
    let (m, pci, _) = open_model(ModelOptions::default());
    let first = Hca::open(pci.clone(), &hca_opts()).unwrap();
    first.alloc_pd().unwrap();
    // Gone without teardown.
    std::mem::forget(first);
    assert!(m.is_initialized());
    let mut hca = Hca::open(pci, &hca_opts()).unwrap();
    assert_eq!(m.live_objects(), 32, "only the new pages: {:?}", m.census());
    hca.close().unwrap();
    assert_eq!(m.live_objects(), 0);
}

/// A command that never completes while the health syndrome is set reports the health.
#[test]
fn timeout_with_a_health_syndrome_says_so() {
    let (m, pci, _) = open_model(ModelOptions::default());
    let hca = Hca::open(pci, &quick(50)).unwrap();
    m.hang_commands(true);
    m.set_health_syndrome(0x7, 0x42);
    let e = hca.alloc_pd().unwrap_err().to_string();
    assert!(
        e.ends_with("firmware unhealthy: health syndrome 0x07, extended syndrome 0x0042"),
        "{e}"
    );
}

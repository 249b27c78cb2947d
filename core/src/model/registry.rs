//! Live model devices by name, so ports and apps find them (a representor port attaches to its
//! VF here). The registry holds weak references: a device lives as long as its VFs' drivers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use super::ModelError;
use super::eswitch::{RepAttachment, RepQueueEnds};
use super::sim::SimCore;
use super::spec::WireSpec;

fn table() -> MutexGuard<'static, BTreeMap<String, Weak<SimCore>>> {
    static T: OnceLock<Mutex<BTreeMap<String, Weak<SimCore>>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(BTreeMap::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn register(name: &str, core: &Arc<SimCore>) -> Result<(), ModelError> {
    let mut t = table();
    if t.get(name).is_some_and(|w| w.strong_count() > 0) {
        return Err(ModelError::Exists(name.to_string()));
    }
    t.insert(name.to_string(), Arc::downgrade(core));
    Ok(())
}

/// Removes `name` if its device is gone.
pub(crate) fn forget(name: &str) {
    let mut t = table();
    if t.get(name).is_some_and(|w| w.strong_count() == 0) {
        t.remove(name);
    }
}

/// Names of the live devices.
pub fn names() -> Vec<String> {
    table()
        .iter()
        .filter(|(_, w)| w.strong_count() > 0)
        .map(|(n, _)| n.clone())
        .collect()
}

fn find(name: &str) -> Result<Arc<SimCore>, ModelError> {
    let found = table().get(name).and_then(Weak::upgrade);
    found.ok_or_else(|| {
        let live = names();
        ModelError::NoDevice {
            name: name.to_string(),
            available: if live.is_empty() {
                "none (create one with --device sim:name=NAME,wire=rep)".into()
            } else {
                live.join(", ")
            },
        }
    })
}

/// The queue pairs of `dev`'s VF `vf`, checking it has a representor wire.
pub fn rep_pairs(dev: &str, vf: u16) -> Result<u16, ModelError> {
    let core = find(dev)?;
    if core.cfg.wire != WireSpec::Rep {
        return Err(ModelError::Rep(format!(
            "device {dev} has wire {:?}: a representor needs wire=rep",
            core.cfg.wire
        )));
    }
    if vf >= core.cfg.vfs {
        return Err(ModelError::Rep(format!(
            "device {dev} has VFs 0..{}: VF {vf} does not exist",
            core.cfg.vfs
        )));
    }
    Ok(core.cfg.queue_pairs)
}

/// Attaches representor channels (one per queue pair, at most the VF's pairs) to `dev`'s VF
/// `vf`. One port per VF at a time; dropping the attachment detaches.
pub fn attach_rep(
    dev: &str,
    vf: u16,
    ends: Vec<RepQueueEnds>,
) -> Result<RepAttachment, ModelError> {
    let pairs = rep_pairs(dev, vf)?;
    if ends.len() > usize::from(pairs) {
        return Err(ModelError::Rep(format!(
            "device {dev} VF {vf} has {pairs} queue pair(s): {} representor queues asked for",
            ends.len()
        )));
    }
    let core = find(dev)?;
    let shared = Arc::clone(&core.engine.vfs()[usize::from(vf)]);
    RepAttachment::attach(Arc::clone(&core.engine), shared, dev, ends)
}

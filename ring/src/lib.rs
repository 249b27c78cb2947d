//! Lock-free burst rings (filled in by the ring work).

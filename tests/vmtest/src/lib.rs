//! Guest test harness (see issue 3). Filled in by the harness work.

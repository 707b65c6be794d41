//! The Lua scripts, one file each in `scripts/`, with `scripts/lib.lua` (Redis's clock, the
//! active states) put before every one. Each script names its KEYS and ARGV at its top and
//! says which rule of [`crate::gateway::coordination::policy`] it mirrors.
//!
//! Scripts that must work while Redis's memory is full (`OOM` under `noeviction`) start with
//! `#!lua flags=allow-oom`: those that keep what runs running (leases, the next state of a
//! running aggregation, the upstream pacing, taking a broken id off a queue) and write only
//! small keys that exist already or replace others. Claims and finishes (rows) have no such
//! flag: a full Redis refuses new aggregations and holds finished rows until memory frees.
//!
//! A script that checks its fence before it writes must not run on a replica (a demoted
//! primary a connection still points at): there it would answer "fenced" from stale data
//! without failing. Every such script has a shebang (`#!lua`, with or without flags), which
//! makes Redis refuse it on a replica with `READONLY`, and the connection moves on.

use std::sync::LazyLock;

/// The shared snippets every script starts with.
const LIB: &str = include_str!("scripts/lib.lua");

/// `body` after the shared snippets; a script's shebang line (`#!lua flags=allow-oom`) stays
/// its first line, where Redis reads it.
fn script(body: &str) -> redis::Script {
    match body.split_once('\n') {
        Some((shebang, rest)) if shebang.starts_with("#!") => redis::Script::new(&format!("{shebang}\n{LIB}\n{rest}")),
        _ => redis::Script::new(&format!("{LIB}\n{body}")),
    }
}

macro_rules! scripts {
    ($($name:ident = $file:literal;)*) => {
        $(
            pub(super) static $name: LazyLock<redis::Script> =
                LazyLock::new(|| script(include_str!(concat!("scripts/", $file))));
        )*
    };
}

scripts! {
    CLAIM = "claim.lua";
    UPDATE = "update.lua";
    FINISH = "finish.lua";
    CONTAINING = "containing.lua";
    DERIVED = "derived.lua";
    DISCARD = "discard.lua";
    OFFER = "offer.lua";
    QUEUE_REFRESH = "queue_refresh.lua";
    OBSERVE_RUN = "observe_run.lua";
    RESTORE_ROWS = "restore_rows.lua";
    ROWS_IF_SMALL = "rows_if_small.lua";
    ROWS_PAGE = "rows_page.lua";
    ACQUIRE = "acquire.lua";
    RENEW = "renew.lua";
    RELEASE = "release.lua";
    EPOCH = "epoch.lua";
    GCRA = "gcra.lua";
    CALLER_TAKE = "caller_take.lua";
    TALLY = "tally.lua";
    ACTIVITY = "activity.lua";
}

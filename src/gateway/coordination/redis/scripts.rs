//! The Lua scripts, one file each in `scripts/`, with `scripts/lib.lua` (Redis's clock, the
//! active states) put before every one. Each script names its KEYS and ARGV at its top and
//! says which rule of [`crate::gateway::coordination::policy`] it mirrors.

use std::sync::LazyLock;

/// The shared snippets every script starts with.
const LIB: &str = include_str!("scripts/lib.lua");

fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{LIB}\n{body}"))
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
    DISCARD = "discard.lua";
    DUE = "due.lua";
    QUEUE_REFRESH = "queue_refresh.lua";
    OBSERVE_RUN = "observe_run.lua";
    RESTORE_ROWS = "restore_rows.lua";
    LOADS = "loads.lua";
    ACQUIRE = "acquire.lua";
    RENEW = "renew.lua";
    RELEASE = "release.lua";
    EPOCH = "epoch.lua";
    GCRA = "gcra.lua";
}

//! The rows of every table, as data: the direct baseline, tollgate in its variants, nginx, and
//! an older tollgate binary (`--old-bin`). `bench/README.md` ("Adding a row") says how to add one.

use std::fmt::Write as _;

/// One row of every table: a way to reach the mock upstream.
pub struct Target {
    pub name: &'static str,
    pub kind: Kind,
    /// Headers this row's client adds to every request (e.g. the gateway key).
    pub headers: &'static [(&'static str, &'static str)],
    /// Runs without `--only`; the others run only when named (`--only tollgate-10k-keys`).
    pub by_default: bool,
}

pub enum Kind {
    /// The mock upstream itself: the baseline of every "added" figure.
    Direct,
    /// A tollgate process: the bench's config (free ports, the mock as upstream, everything else
    /// at its default) plus the variant's additions.
    Tollgate(Variant),
    /// The tollgate binary of `--old-bin` (an older build), with the `tollgate` row's variant:
    /// runs whenever that option is given, and only then.
    OldBinary(Variant),
    /// nginx as a plain reverse proxy (`bench/nginx.conf`), when installed: with one upstream
    /// server, or the mock's three replicas under `least_conn`.
    Nginx { endpoints: usize },
}

/// A gateway config variant. To measure another configuration, add a [`Target`] with
/// `Kind::Tollgate(Variant { .. })`: its TOML goes into the places below, and the client sends
/// the row's [`Target::headers`].
pub struct Variant {
    /// Lines added inside `[server]`.
    pub server: &'static str,
    /// Lines added inside `[upstream]` (or the pool's `[[upstreams]]`).
    pub upstream: &'static str,
    /// 1: `[upstream] url`, the mock; more: one `[[upstreams]]` pool of that many of the mock's
    /// replicas, `least_requests`.
    pub endpoints: usize,
    /// Tables appended after `[upstream]` (`[[keys]]`, `[policies.x]`, …): a function, so that a
    /// variant can generate many. Relative paths land in the row's own directory (tollgate runs
    /// with it as its working directory).
    pub tables: fn() -> String,
}

/// The client key every row sends (the direct and nginx rows send it too, so that every row's
/// requests are the same bytes; nginx replaces it with the upstream credential, the mock ignores
/// it). Its SHA-256 (`printf %s KEY | sha256sum`) is what the gateway rows configure.
const CLIENT_KEY_HEADER: (&str, &str) = (
    "authorization",
    "Bearer tg-0123456789abcdef0123456789abcdef0123456789abcdef",
);
const CLIENT_KEY_SHA256: &str = "3afc714881401d7d9a57454c7e41f3583337c49a0258b640b031d09e4a83c0bd";

/// The bench key, as operators configure one: no limits.
fn one_key() -> String {
    format!("[[keys]]\nname = \"bench\"\nsha256 = \"{CLIENT_KEY_SHA256}\"\n")
}

/// The bench key with a concurrency and a rate limit it never reaches: the cost of the limiter.
fn one_key_with_limits() -> String {
    format!(
        "[[keys]]\nname = \"bench\"\nsha256 = \"{CLIENT_KEY_SHA256}\"\nconcurrency = 100000\n\
         rate = {{ requests = 1000000000, per = \"1s\" }}\n"
    )
}

/// The bench key as deployed (issue 14): a rate, a concurrency limit, a daily token quota and a
/// `max_tokens` cap, with the quota windows saved to local state and a ledger line per request.
/// None of the limits is ever reached: the rate and concurrency are far above what the bench
/// sends, the quota is 10^15 tokens a day, and the bench's requests name `max_tokens: 8`, below the
/// cap (so they go upstream unchanged and every row gets the same answers).
fn full_policy_key() -> String {
    format!(
        "[state]\npath = \"state/tollgate.db\"\n\n[ledger]\npath = \"ledger/usage.jsonl\"\n\n\
         [[keys]]\nname = \"bench\"\nsha256 = \"{CLIENT_KEY_SHA256}\"\nconcurrency = 100000\n\
         rate = {{ requests = 1000000000, per = \"1s\" }}\nmax_tokens = 4096\n\
         quotas = [{{ tokens = 1000000000000000, per = \"1d\" }}]\n"
    )
}

/// 10 000 other keys besides the bench key: lookups must not grow with the table.
fn ten_thousand_keys() -> String {
    let mut tables = one_key();
    for i in 1..=10_000u32 {
        let _ = write!(
            tables,
            "[[keys]]\nname = \"k{i:05}\"\nsha256 = \"{i:064x}\"\n"
        );
    }
    tables
}

/// Stands for the mock upstream's URL in a variant's tables (the row writer puts it in).
pub const MOCK_URL: &str = "@MOCK_URL@";

/// The bench key, and traces sent to the mock's OTLP sink with every trace kept.
fn one_key_traced_all() -> String {
    format!(
        "{}[telemetry]\notlp_endpoint = \"{MOCK_URL}\"\nsample_ratio = 1.0\n",
        one_key()
    )
}

/// The same, one trace in a hundred kept (the others still send a `traceparent` upstream).
fn one_key_traced_one_in_100() -> String {
    format!(
        "{}[telemetry]\notlp_endpoint = \"{MOCK_URL}\"\nsample_ratio = 0.01\n",
        one_key()
    )
}

/// The rows, in table order. `direct` must stay first: it is the baseline.
pub const TARGETS: &[Target] = &[
    Target {
        name: "direct",
        kind: Kind::Direct,
        headers: &[CLIENT_KEY_HEADER],
        by_default: true,
    },
    Target {
        name: "tollgate",
        kind: Kind::Tollgate(Variant {
            server: "",
            upstream: "",
            endpoints: 1,
            tables: one_key,
        }),
        headers: &[CLIENT_KEY_HEADER],
        by_default: true,
    },
    Target {
        name: FULL_ROW,
        kind: Kind::Tollgate(Variant {
            server: "",
            upstream: "",
            endpoints: 1,
            tables: full_policy_key,
        }),
        headers: &[CLIENT_KEY_HEADER],
        by_default: true,
    },
    Target {
        name: OLD_ROW,
        kind: Kind::OldBinary(Variant {
            server: "",
            upstream: "",
            endpoints: 1,
            tables: one_key,
        }),
        headers: &[CLIENT_KEY_HEADER],
        by_default: false,
    },
    Target {
        name: "nginx",
        kind: Kind::Nginx { endpoints: 1 },
        headers: &[CLIENT_KEY_HEADER],
        by_default: true,
    },
    Target {
        name: "tollgate-3",
        kind: Kind::Tollgate(Variant {
            server: "",
            upstream: "balance = \"least_requests\"",
            endpoints: 3,
            tables: one_key,
        }),
        headers: &[CLIENT_KEY_HEADER],
        by_default: true,
    },
    Target {
        name: "nginx-3",
        kind: Kind::Nginx { endpoints: 3 },
        headers: &[CLIENT_KEY_HEADER],
        by_default: true,
    },
    Target {
        name: "tollgate+limits",
        kind: Kind::Tollgate(Variant {
            server: "",
            upstream: "",
            endpoints: 1,
            tables: one_key_with_limits,
        }),
        headers: &[CLIENT_KEY_HEADER],
        by_default: false,
    },
    Target {
        name: "tollgate-no-inject",
        kind: Kind::Tollgate(Variant {
            server: "",
            upstream: "inject_usage = false",
            endpoints: 1,
            tables: one_key,
        }),
        headers: &[CLIENT_KEY_HEADER],
        by_default: false,
    },
    Target {
        name: "tollgate-traces-1",
        kind: Kind::Tollgate(Variant {
            server: "",
            upstream: "",
            endpoints: 1,
            tables: one_key_traced_all,
        }),
        headers: &[CLIENT_KEY_HEADER],
        by_default: false,
    },
    Target {
        name: "tollgate-traces-0.01",
        kind: Kind::Tollgate(Variant {
            server: "",
            upstream: "",
            endpoints: 1,
            tables: one_key_traced_one_in_100,
        }),
        headers: &[CLIENT_KEY_HEADER],
        by_default: false,
    },
    Target {
        name: "tollgate-10k-keys",
        kind: Kind::Tollgate(Variant {
            server: "",
            upstream: "",
            endpoints: 1,
            tables: ten_thousand_keys,
        }),
        headers: &[CLIENT_KEY_HEADER],
        by_default: false,
    },
];

/// The credential both proxies send upstream (the mock does not check it).
pub const UPSTREAM_KEY_ENV: &str = "TOLLGATE_BENCH_UPSTREAM_KEY";
pub const UPSTREAM_KEY: &str = "bench-upstream-key";

/// The rows the goals compare: the no-limits gateway, the full-policy one, and nginx.
pub const PLAIN_ROW: &str = "tollgate";
pub const FULL_ROW: &str = "tollgate-full";
pub const NGINX_ROW: &str = "nginx";

/// The name of the `--old-bin` row.
pub const OLD_ROW: &str = "tollgate-old";

/// `--list`: the rows, and which run only when named.
pub fn print_list() {
    for target in TARGETS {
        let note = match target.kind {
            Kind::OldBinary(_) => "  (only with --old-bin PATH)",
            _ if target.by_default => "",
            _ => "  (only with --only)",
        };
        println!("{}{note}", target.name);
    }
}

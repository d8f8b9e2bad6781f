//! `config/grafana-dashboard.json` queries only what the gateway exports.
//!
//! A mixed workload runs through real gateways, `/metrics` is scraped, and every PromQL `expr` of
//! the dashboard (and its `label_values(…)` variable) is tokenized: each metric it names must be
//! exported — a histogram only through `_bucket`/`_sum`/`_count`, anything else only by its own
//! name — and each label it matches, groups by or shows in a legend must exist on that metric.
//! A panel that silently shows nothing because of a typo fails here.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use mock_upstream::MockUpstream;
use serde_json::{json, Value};

use crate::common::{self, key_entry, TestGateway};

const DASHBOARD: &str = include_str!("../../config/grafana-dashboard.json");
const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

// === the exposition format ===

/// What a gateway exports: each family's `# TYPE`, each series name's label names and values.
#[derive(Default, Debug)]
struct Export {
    types: HashMap<String, String>,
    /// Series name (`x_bucket`, `x_sum`, `x_count` for a histogram `x`) → label → values.
    series: HashMap<String, HashMap<String, BTreeSet<String>>>,
}

impl Export {
    fn parse(text: &str) -> Export {
        let mut export = Export::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut words = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                    export.types.insert(name.to_owned(), kind.to_owned());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let name_end = line.find(['{', ' ']).expect("a sample has a value");
            let labels = export
                .series
                .entry(line[..name_end].to_owned())
                .or_default();
            if line[name_end..].starts_with('{') {
                for (label, value) in parse_labels(&line[name_end + 1..]) {
                    labels.entry(label).or_default().insert(value);
                }
            }
        }
        export
    }

    /// Both exports' series, as one gateway's would be after both workloads.
    fn merge(mut self, other: Export) -> Export {
        self.types.extend(other.types);
        for (name, labels) in other.series {
            let mine = self.series.entry(name).or_default();
            for (label, values) in labels {
                mine.entry(label).or_default().extend(values);
            }
        }
        self
    }
}

/// `a="x",b="y\"z"} 1` → [(a, x), (b, y"z)].
fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        let name: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != '}'))
            .collect::<String>()
            .trim_start_matches(',')
            .to_owned();
        if chars.next() != Some('=') {
            return out;
        }
        assert_eq!(chars.next(), Some('"'), "label value quoted");
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.push((name, value));
    }
}

// === a small PromQL tokenizer ===

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    /// Numbers and durations (`0.99`, `5m`).
    Num(String),
    /// A Grafana variable (`$__rate_interval`, `${key}`).
    Var(String),
    Punct(&'static str),
}

const PUNCT: [&str; 25] = [
    "=~", "!~", "!=", "==", ">=", "<=", "(", ")", "{", "}", "[", "]", ",", "=", "+", "-", "*", "/",
    "%", "^", "<", ">", "@", ":", ";",
];

fn tokenize(expr: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    let take = |i: &mut usize, ok: &dyn Fn(char) -> bool| -> String {
        let start = *i;
        while *i < chars.len() && ok(chars[*i]) {
            *i += 1;
        }
        chars[start..*i].iter().collect()
    };
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            take(&mut i, &|c| c != '\n');
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            tokens.push(Tok::Ident(take(&mut i, &|c| {
                c.is_ascii_alphanumeric() || c == '_' || c == ':'
            })));
        } else if c.is_ascii_digit() || c == '.' {
            tokens.push(Tok::Num(take(&mut i, &|c| {
                c.is_ascii_alphanumeric() || c == '.'
            })));
        } else if c == '$' {
            i += 1;
            let braced = chars.get(i) == Some(&'{');
            i += usize::from(braced);
            let name = take(&mut i, &|c| c.is_ascii_alphanumeric() || c == '_');
            if braced {
                if chars.get(i) != Some(&'}') {
                    return Err(format!("unclosed ${{ in {expr}"));
                }
                i += 1;
            }
            tokens.push(Tok::Var(name));
        } else if c == '"' || c == '\'' || c == '`' {
            i += 1;
            let mut value = String::new();
            loop {
                match chars.get(i) {
                    None => return Err(format!("unclosed string in {expr}")),
                    Some('\\') if c != '`' => {
                        value.extend(chars.get(i + 1));
                        i += 2;
                    }
                    Some(&q) if q == c => {
                        i += 1;
                        break;
                    }
                    Some(&other) => {
                        value.push(other);
                        i += 1;
                    }
                }
            }
            tokens.push(Tok::Str(value));
        } else if let Some(p) = PUNCT
            .iter()
            .find(|p| chars[i..].iter().take(p.len()).copied().eq(p.chars()))
        {
            tokens.push(Tok::Punct(p));
            i += p.len();
        } else {
            return Err(format!("unexpected {c:?} in {expr}"));
        }
    }
    Ok(tokens)
}

/// Functions and aggregations a dashboard may call (an unknown name is a typo).
const FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "absent_over_time",
    "avg_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "count_over_time",
    "delta",
    "deriv",
    "exp",
    "floor",
    "histogram_avg",
    "histogram_count",
    "histogram_fraction",
    "histogram_quantile",
    "histogram_sum",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "max_over_time",
    "min_over_time",
    "predict_linear",
    "quantile_over_time",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sort",
    "sort_desc",
    "sqrt",
    "stddev_over_time",
    "sum_over_time",
    "time",
    "timestamp",
    "vector",
];
const AGGREGATIONS: &[&str] = &[
    "avg",
    "bottomk",
    "count",
    "count_values",
    "group",
    "limitk",
    "limit_ratio",
    "max",
    "min",
    "quantile",
    "stddev",
    "stdvar",
    "sum",
    "topk",
];
/// Keywords that are neither metric nor function.
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
];
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

#[derive(Debug)]
struct Selector {
    name: String,
    /// (label, operator, value).
    matchers: Vec<(String, &'static str, String)>,
    at: usize,
}

#[derive(Debug)]
struct Grouping {
    keyword: String,
    labels: Vec<String>,
    at: usize,
    /// For `by`/`without`: the token range of the aggregation's argument.
    scope: Option<(usize, usize)>,
}

#[derive(Debug, Default)]
struct Query {
    selectors: Vec<Selector>,
    groupings: Vec<Grouping>,
}

/// The index of the bracket that closes the one at `open`.
fn closing(tokens: &[Tok], open: usize) -> Result<usize, String> {
    let (o, c) = match tokens[open] {
        Tok::Punct("(") => ("(", ")"),
        Tok::Punct("{") => ("{", "}"),
        Tok::Punct("[") => ("[", "]"),
        ref other => return Err(format!("{other:?} is not an opening bracket")),
    };
    let mut depth = 0;
    for (i, t) in tokens.iter().enumerate().skip(open) {
        if *t == Tok::Punct(o) {
            depth += 1;
        } else if *t == Tok::Punct(c) {
            depth -= 1;
            if depth == 0 {
                return Ok(i);
            }
        }
    }
    Err("unbalanced brackets".into())
}

/// The index of the bracket that opens the one closed at `close`.
fn opening(tokens: &[Tok], close: usize) -> Option<usize> {
    let mut depth = 0;
    for i in (0..=close).rev() {
        match tokens[i] {
            Tok::Punct(")") => depth += 1,
            Tok::Punct("(") => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

fn ident(tokens: &[Tok], i: usize) -> Option<&str> {
    match tokens.get(i) {
        Some(Tok::Ident(s)) => Some(s),
        _ => None,
    }
}

fn analyse(expr: &str) -> Result<Query, String> {
    let tokens = tokenize(expr)?;
    let mut query = Query::default();
    let mut i = 0;
    while i < tokens.len() {
        // `f(`, or an aggregation written `sum by (…) (…)`.
        let call = tokens.get(i + 1) == Some(&Tok::Punct("("))
            || (ident(&tokens, i).is_some_and(|w| AGGREGATIONS.contains(&w))
                && ident(&tokens, i + 1).is_some_and(|w| w == "by" || w == "without"));
        match &tokens[i] {
            Tok::Punct("[") => i = closing(&tokens, i)? + 1,
            Tok::Punct("{") => return Err(format!("a selector without a metric name in {expr}")),
            Tok::Ident(word) if GROUPING.contains(&word.as_str()) => {
                if !call {
                    // `group_left` may stand alone.
                    i += 1;
                    continue;
                }
                let close = closing(&tokens, i + 1)?;
                let mut labels = Vec::new();
                for t in &tokens[i + 2..close] {
                    match t {
                        Tok::Ident(l) => labels.push(l.clone()),
                        Tok::Punct(",") => {}
                        other => return Err(format!("{other:?} in {word}(…) of {expr}")),
                    }
                }
                // `agg by (…) (arg)` or `agg (arg) by (…)`.
                let scope = if word == "by" || word == "without" {
                    let before = ident(&tokens, i.wrapping_sub(1));
                    if before.is_some_and(|w| AGGREGATIONS.contains(&w)) {
                        Some((close + 1, closing(&tokens, close + 1)?))
                    } else {
                        let arg_open = i
                            .checked_sub(1)
                            .and_then(|end| opening(&tokens, end))
                            .filter(|&o| {
                                ident(&tokens, o.wrapping_sub(1))
                                    .is_some_and(|w| AGGREGATIONS.contains(&w))
                            })
                            .ok_or_else(|| {
                                format!("{word} (…) outside an aggregation in {expr}")
                            })?;
                        Some((arg_open, i - 1))
                    }
                } else {
                    None
                };
                query.groupings.push(Grouping {
                    keyword: word.clone(),
                    labels,
                    at: i,
                    scope,
                });
                i = close + 1;
            }
            Tok::Ident(word) if call => {
                if !FUNCTIONS.contains(&word.as_str()) && !AGGREGATIONS.contains(&word.as_str()) {
                    return Err(format!("unknown function {word} in {expr}"));
                }
                i += 1;
            }
            Tok::Ident(word) if KEYWORDS.contains(&word.as_str()) => i += 1,
            Tok::Ident(name) => {
                let mut selector = Selector {
                    name: name.clone(),
                    matchers: Vec::new(),
                    at: i,
                };
                i += 1;
                if next_is_brace(&tokens, i) {
                    let close = closing(&tokens, i)?;
                    let mut j = i + 1;
                    while j < close {
                        match (&tokens[j], tokens.get(j + 1), tokens.get(j + 2)) {
                            (Tok::Ident(label), Some(Tok::Punct(op)), Some(Tok::Str(value)))
                                if ["=", "!=", "=~", "!~"].contains(op) =>
                            {
                                selector.matchers.push((label.clone(), *op, value.clone()));
                                j += 3;
                            }
                            (Tok::Punct(","), _, _) => j += 1,
                            other => return Err(format!("bad matcher {other:?} in {expr}")),
                        }
                    }
                    i = close + 1;
                }
                query.selectors.push(selector);
            }
            _ => i += 1,
        }
    }
    Ok(query)
}

fn next_is_brace(tokens: &[Tok], i: usize) -> bool {
    tokens.get(i) == Some(&Tok::Punct("{"))
}

// === the checks ===

/// The labels a selector's series carry, or why the metric is not exported as named.
fn labels_of<'a>(
    name: &str,
    export: &'a Export,
) -> Result<&'a HashMap<String, BTreeSet<String>>, String> {
    let suffixed = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix));
    if let Some(base) = suffixed {
        match export.types.get(base).map(String::as_str) {
            Some("histogram") => {}
            Some(other) => {
                return Err(format!(
                    "{name}: {base} is a {other}, not a histogram: drop the suffix"
                ))
            }
            None => return Err(format!("{name}: no histogram {base} is exported")),
        }
    } else if export.types.get(name).map(String::as_str) == Some("histogram") {
        return Err(format!(
            "{name} is a histogram: query {name}_bucket, _sum or _count"
        ));
    }
    export
        .series
        .get(name)
        .ok_or_else(|| format!("{name} is not exported"))
}

/// Every problem of one query: unknown metrics, labels, label values and legend labels.
fn check_expr(expr: &str, legend: &str, export: &Export) -> Vec<String> {
    let query = match analyse(expr) {
        Ok(query) => query,
        Err(error) => return vec![error],
    };
    let mut problems = Vec::new();
    if query.selectors.is_empty() {
        problems.push(format!("no metric in {expr}"));
    }
    let mut resolved = Vec::new();
    for selector in &query.selectors {
        match labels_of(&selector.name, export) {
            Ok(labels) => resolved.push((selector, labels)),
            Err(problem) => problems.push(problem),
        }
    }
    for (selector, labels) in &resolved {
        for (label, op, value) in &selector.matchers {
            match labels.get(label) {
                None => problems.push(format!("{}: no label {label}", selector.name)),
                // A literal equality must name a value the workload produced.
                Some(values) if *op == "=" && !value.contains('$') && !values.contains(value) => {
                    problems.push(format!(
                        "{}{{{label}=\"{value}\"}}: no such value (seen {values:?})",
                        selector.name
                    ));
                }
                Some(_) => {}
            }
        }
    }
    for grouping in &query.groupings {
        let in_scope = resolved.iter().filter(|(s, _)| {
            grouping
                .scope
                .is_none_or(|(from, to)| (from..to).contains(&s.at))
        });
        for (selector, labels) in in_scope {
            for label in &grouping.labels {
                if !labels.contains_key(label) {
                    problems.push(format!(
                        "{} ({}) at token {}: {} has no label {label}",
                        grouping.keyword,
                        grouping.labels.join(", "),
                        grouping.at,
                        selector.name
                    ));
                }
            }
        }
    }
    // A legend shows the labels the result keeps: the `by` labels, or the series' own.
    let kept: BTreeSet<&str> = if query.groupings.iter().any(|g| g.keyword == "by") {
        query
            .groupings
            .iter()
            .filter(|g| g.keyword == "by")
            .flat_map(|g| g.labels.iter().map(String::as_str))
            .collect()
    } else {
        resolved
            .iter()
            .flat_map(|(_, labels)| labels.keys().map(String::as_str))
            .collect()
    };
    for part in legend.split("{{").skip(1) {
        let label = part.split("}}").next().unwrap_or_default().trim();
        if !kept.contains(label) {
            problems.push(format!("legend {{{{{label}}}}}: not a label of {expr}"));
        }
    }
    problems
}

/// Every panel's targets, nested rows included: (panel title, expr, legend).
fn targets(panels: &Value, out: &mut Vec<(String, String, String)>) {
    for panel in panels.as_array().into_iter().flatten() {
        let title = panel["title"].as_str().unwrap_or("?").to_owned();
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default().to_owned();
            let legend = target["legendFormat"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            out.push((title.clone(), expr, legend));
        }
        targets(&panel["panels"], out);
    }
}

/// Every problem of a dashboard against an export.
fn problems(dashboard: &Value, export: &Export) -> Vec<String> {
    let mut found = Vec::new();
    let mut all = Vec::new();
    targets(&dashboard["panels"], &mut all);
    for (title, expr, legend) in &all {
        if expr.is_empty() {
            found.push(format!("{title}: a target without expr"));
        }
        found.extend(
            check_expr(expr, legend, export)
                .into_iter()
                .map(|p| format!("{title}: {p}")),
        );
    }
    // `label_values(metric, label)` variables.
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let query = variable["query"]["query"]
            .as_str()
            .or(variable["query"].as_str())
            .unwrap_or_default();
        let Some(args) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
        else {
            continue;
        };
        let (metric, label) = args.split_once(',').unwrap_or(("", args));
        match labels_of(metric.trim(), export) {
            Ok(labels) if labels.contains_key(label.trim()) => {}
            Ok(_) => found.push(format!(
                "variable: {} has no label {}",
                metric.trim(),
                label.trim()
            )),
            Err(problem) => found.push(format!("variable: {problem}")),
        }
    }
    found
}

// === the workload ===

/// Path, body, extra headers, the status expected.
type Case = (&'static str, Value, Vec<(&'static str, &'static str)>, u16);

async fn send(base: &str, path: &str, body: Value, headers: &[(&str, &str)]) -> u16 {
    let mut request = common::client()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(body.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("request sent");
    let status = response.status().as_u16();
    // A broken upstream stream ends in an error here: that is the point of that request.
    let _ = response.bytes().await;
    status
}

fn chat(max_tokens: u64, stream: bool) -> Value {
    json!({"model": "mock-model", "messages": [{"role": "user", "content": "hello there"}],
           "max_tokens": max_tokens, "stream": stream})
}

/// JSON and streamed answers, 401, 429 (rate and quota), 400 (validation and policy), an upstream
/// 503, a stream the upstream breaks off, a quota overrun, and a ledger that cannot be written.
async fn mixed_workload(upstream: &MockUpstream) -> Export {
    let keys = [
        key_entry(
            "rl",
            "tg-rl",
            "rate = { requests = 1, per = \"1m\", burst = 1 }",
        ),
        key_entry("pol", "tg-pol", "models = [\"mock-model\"]"),
        key_entry(
            "q",
            "tg-q",
            "max_tokens = 50\nquotas = [{ tokens = 120, per = \"1m\" }]",
        ),
        key_entry(
            "o",
            "tg-o",
            "max_tokens = 100\nquotas = [{ tokens = 100000, per = \"1d\" }]",
        ),
        // A key in a group, with a cost window of its own: the budgets' series.
        key_entry(
            "b",
            "tg-b",
            "group = \"team\"\nmax_tokens = 50\nquotas = [{ cost = 5.0, per = \"month\" }]",
        ),
    ]
    .concat();
    let budgets = "[pricing]\nmodels = [{ model = \"*\", prompt = 1.0, completion = 2.0 }]\n\
                   [groups.team]\nconcurrency = 4\n\
                   quotas = [{ cost = 50.0, per = \"month\" }, { tokens = 100000, per = \"week\" }]\n";
    // /dev/full takes the open and fails every write: lost ledger lines.
    let ledger = if std::path::Path::new("/dev/full").exists() {
        "[ledger]\npath = \"/dev/full\"\n"
    } else {
        ""
    };
    let toml = common::config_toml(
        &upstream.url(),
        "",
        "",
        &format!("{budgets}\n{keys}\n{ledger}"),
    );
    let gateway = TestGateway::start_toml(&toml).await;
    let base = gateway.url();
    let bearer = |token: &'static str| ("authorization", token);
    let cases: Vec<Case> = vec![
        (CHAT, chat(5, false), vec![], 200),
        (CHAT, chat(5, true), vec![], 200),
        (
            COMPLETIONS,
            json!({"model": "mock-model", "prompt": "Say hi", "max_tokens": 3, "stream": true}),
            vec![],
            200,
        ),
        (CHAT, chat(5, false), vec![bearer("Bearer tg-unknown")], 401),
        (CHAT, chat(5, false), vec![bearer("Bearer tg-rl")], 200),
        (CHAT, chat(5, false), vec![bearer("Bearer tg-rl")], 429),
        (CHAT, json!({"model": "mock-model"}), vec![], 400),
        (
            CHAT,
            json!({"model": "another-model", "messages": [{"role": "user", "content": "hi"}]}),
            vec![bearer("Bearer tg-pol")],
            400,
        ),
        (CHAT, chat(5, false), vec![("x-mock-status", "503")], 503),
        (
            CHAT,
            chat(5, true),
            vec![("x-mock-fault", "abort-after=2")],
            200,
        ),
        (CHAT, chat(40, false), vec![bearer("Bearer tg-q")], 200),
        (CHAT, chat(50, false), vec![bearer("Bearer tg-q")], 429),
        (
            CHAT,
            chat(5, false),
            vec![bearer("Bearer tg-o"), ("x-mock-chunks", "60")],
            200,
        ),
        (CHAT, chat(5, true), vec![bearer("Bearer tg-b")], 200),
    ];
    for (path, body, headers, expected) in cases {
        let status = send(&base, path, body.clone(), &headers).await;
        assert_eq!(status, expected, "{path} {body} {headers:?}");
    }
    for key in ["test", "q", "o", "b"] {
        let idle = format!("tollgate_inflight_requests{{key=\"{key}\"}} 0");
        assert!(
            gateway
                .wait_for_metric(&idle, Duration::from_secs(10))
                .await,
            "{key}: every request settled"
        );
    }
    if !ledger.is_empty() {
        assert!(
            gateway
                .wait_for_metrics(
                    |m| common::counted(m, "tollgate_ledger_errors_total{"),
                    Duration::from_secs(10)
                )
                .await,
            "lost ledger lines counted"
        );
    }
    Export::parse(&gateway.metrics().await)
}

/// A gateway whose Redis state backend is unreachable: state errors.
async fn redis_down_workload(upstream: &MockUpstream) -> Export {
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nurl = \"{}\"\n\
         [state]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:{}\"\n{}",
        upstream.url(),
        common::closed_port(),
        key_entry(
            "r",
            "tg-r",
            "max_tokens = 10\nconcurrency = 4\nquotas = [{ tokens = 1000, per = \"1h\" }]"
        ),
    );
    let gateway = TestGateway::start_toml(&toml).await;
    let _ = send(
        &gateway.url(),
        CHAT,
        chat(5, false),
        &[("authorization", "Bearer tg-r")],
    )
    .await;
    assert!(
        gateway
            .wait_for_metrics(
                |m| common::counted(m, "tollgate_state_errors_total{"),
                Duration::from_secs(10)
            )
            .await,
        "an unreachable Redis is counted"
    );
    Export::parse(&gateway.metrics().await)
}

#[tokio::test]
async fn every_dashboard_query_names_exported_metrics_and_labels() {
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    assert_eq!(dashboard["schemaVersion"], 39);

    let upstream = MockUpstream::start().await.expect("mock upstream");
    let mut export = mixed_workload(&upstream).await;
    // tollgate_state_errors_total is registered in src/observability/metrics.rs (the Redis backend), so it is
    // not exempt: a gateway whose Redis is unreachable exports it.
    export = export.merge(redis_down_workload(&upstream).await);
    if !std::path::Path::new("/dev/full").exists() {
        // Without /dev/full no ledger write can be made to fail here; the one exemption.
        eprintln!("no /dev/full: tollgate_ledger_errors_total not provoked");
        export
            .types
            .insert("tollgate_ledger_errors_total".into(), "counter".into());
        export.series.insert(
            "tollgate_ledger_errors_total".into(),
            HashMap::from([("reason".into(), BTreeSet::new())]),
        );
    }

    let found = problems(&dashboard, &export);
    assert!(
        found.is_empty(),
        "the dashboard queries what is not exported:\n{}",
        found.join("\n")
    );

    // Every metric the gateway exports is on the dashboard.
    let mut all = Vec::new();
    targets(&dashboard["panels"], &mut all);
    let used: BTreeSet<String> = all
        .iter()
        .filter_map(|(_, expr, _)| analyse(expr).ok())
        .flat_map(|q| q.selectors.into_iter().map(|s| s.name))
        .map(|name| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name)
                .to_owned()
        })
        .collect();
    let missing: Vec<&String> = export
        .types
        .keys()
        .filter(|name| name.starts_with("tollgate_") && !used.contains(*name))
        .collect();
    assert!(missing.is_empty(), "not on the dashboard: {missing:?}");

    // The checker itself: each kind of typo is caught.
    for (from, to) in [
        ("tollgate_tokens_total{", "tollgate_token_total{"),
        ("sum by (reason)", "sum by (reasons)"),
        ("status=~", "code=~"),
        ("source=\\\"estimated\\\"", "source=\\\"estimate\\\""),
        (
            "tollgate_overhead_seconds_bucket",
            "tollgate_overhead_seconds",
        ),
        ("tollgate_tokens_total{", "tollgate_tokens_total_count{"),
        ("histogram_quantile(", "histogram_quantil("),
        ("\"{{kind}}\"", "\"{{knd}}\""),
        (
            "label_values(tollgate_requests_total, key)",
            "label_values(tollgate_requests_total, keys)",
        ),
        (
            "sum by (key, endpoint, le)",
            "sum by (key, endpoint, le, window)",
        ),
    ] {
        assert!(DASHBOARD.contains(from), "{from} is in the dashboard");
        let broken: Value = serde_json::from_str(&DASHBOARD.replace(from, to)).expect("still JSON");
        assert!(
            !problems(&broken, &export).is_empty(),
            "a typo ({from} → {to}) goes unnoticed"
        );
    }
}

#[test]
fn the_tokenizer_finds_metrics_labels_and_scopes() {
    let query = analyse(
        r#"sum by (key) (rate(a_total{key=~"$key", status!="200"}[$__rate_interval] offset 5m)) / on (key) group_left sum(b) by (key)"#,
    )
    .expect("parses");
    let names: Vec<&str> = query.selectors.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a_total", "b"]);
    assert_eq!(
        query.selectors[0].matchers,
        [
            ("key".to_owned(), "=~", "$key".to_owned()),
            ("status".to_owned(), "!=", "200".to_owned())
        ]
    );
    let scopes: Vec<(&str, bool)> = query
        .groupings
        .iter()
        .map(|g| (g.keyword.as_str(), g.scope.is_some()))
        .collect();
    assert_eq!(scopes, [("by", true), ("on", false), ("by", true)]);
    // The trailing `by (key)` covers `b` only.
    let last = query.groupings[2].scope.expect("scoped");
    assert!((last.0..last.1).contains(&query.selectors[1].at));
    assert!(!(last.0..last.1).contains(&query.selectors[0].at));
    assert!(analyse("rat(x[5m])").is_err(), "unknown function");
}

//! What each build got: the calls of every invocation, kept per REAPI `tool_invocation_id`
//! (from the `requestmetadata-bin` header every REAPI client sends with each call: Bazel's
//! `--invocation_id`, `recache run --invocation-id`), for `GET /status` (JSON) and the status
//! page ([`crate::status_page`]). The question it answers: why did my build miss?
//!
//! Bounded: the [`INVOCATIONS`] most recently seen invocations (the least recently seen is
//! dropped first), each with at most [`MISSES_KEPT`] miss records (action id, mnemonic, target,
//! why), [`MNEMONICS_KEPT`] mnemonics and [`TARGETS_KEPT`] targets counted by name (the rest
//! under `(other)`), every string cut at [`TEXT_BYTES`]: under 100 MiB with every invocation at
//! every limit, while a build with a few hundred misses takes tens of KiB. ActionCache lookups without an
//! invocation id count in the hour's chart only.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;

/// Invocations kept.
pub const INVOCATIONS: usize = 1000;
/// Miss records kept per invocation (the first ones; later misses are counted only).
pub const MISSES_KEPT: usize = 100;
/// Distinct mnemonics counted per invocation; the rest count as `(other)`.
pub const MNEMONICS_KEPT: usize = 32;
/// Distinct targets counted per invocation; the rest count as `(other)`.
pub const TARGETS_KEPT: usize = 64;
/// Longest string kept (tool, id, mnemonic, target), in bytes.
pub const TEXT_BYTES: usize = 160;
/// Minutes of ActionCache lookups kept for the hour's chart.
const MINUTES: usize = 60;

/// What a REAPI client says of a call (its `RequestMetadata`), each string cut to
/// [`TEXT_BYTES`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Caller {
    pub tool: String,
    pub invocation_id: String,
    pub correlated_id: String,
    pub action_id: String,
    pub mnemonic: String,
    pub target: String,
}

/// The `requestmetadata-bin` header of a request, if it has a well-formed one.
pub(crate) fn caller(headers: &http::HeaderMap) -> Option<Caller> {
    use base64::Engine as _;
    let raw = headers.get("build.bazel.remote.execution.v2.requestmetadata-bin")?;
    let text = raw.to_str().ok()?.trim_end_matches('=');
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(text)
        .ok()?;
    let md =
        reapi::build::bazel::remote::execution::v2::RequestMetadata::decode(&bytes[..]).ok()?;
    let tool = md
        .tool_details
        .map(|t| format!("{} {}", t.tool_name, t.tool_version))
        .unwrap_or_default();
    Some(Caller {
        tool: cut(tool.trim()),
        invocation_id: cut(&md.tool_invocation_id),
        correlated_id: cut(&md.correlated_invocations_id),
        action_id: cut(&md.action_id),
        mnemonic: cut(&md.action_mnemonic),
        target: cut(&md.target_id),
    })
}

/// `s`, at most [`TEXT_BYTES`] long (cut at a character boundary).
fn cut(s: &str) -> String {
    let mut end = s.len().min(TEXT_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// What an ActionCache lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    Hit,
    /// Nothing recorded for the action.
    Miss,
    /// An entry was recorded, but an output it names was evicted (the entry was dropped).
    OutputsGone,
}

/// One call, as the status page counts it.
#[derive(Debug, Default)]
pub(crate) struct Call {
    pub caller: Option<Caller>,
    pub identity: Option<String>,
    pub lookup: Option<Lookup>,
    /// Bytes received from the client (request bodies).
    pub bytes_up: u64,
    /// Bytes sent to the client (response bodies).
    pub bytes_down: u64,
}

/// A miss, as listed on an invocation's page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Miss {
    pub at: SystemTime,
    pub action_id: String,
    pub mnemonic: String,
    pub target: String,
    pub outputs_gone: bool,
}

/// One invocation's record.
#[derive(Debug, Clone)]
pub(crate) struct Invocation {
    pub id: String,
    pub tool: String,
    pub correlated_id: String,
    /// Who called (the token's or certificate's name), as last seen.
    pub identity: Option<String>,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    pub requests: u64,
    pub hits: u64,
    pub misses: u64,
    pub misses_outputs_gone: u64,
    pub bytes_down: u64,
    pub bytes_up: u64,
    /// Misses by mnemonic and by target (at most [`MNEMONICS_KEPT`] / [`TARGETS_KEPT`] names).
    pub mnemonics: HashMap<String, u64>,
    pub targets: HashMap<String, u64>,
    /// The first [`MISSES_KEPT`] misses.
    pub missed: Vec<Miss>,
}

impl Invocation {
    /// The names most counted in `counts`, most first (ties by name), at most `n`.
    pub fn top(counts: &HashMap<String, u64>, n: usize) -> Vec<(String, u64)> {
        let mut v: Vec<_> = counts.iter().map(|(k, c)| (k.clone(), *c)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }

    /// Hits over lookups, if it made any.
    pub fn hit_ratio(&self) -> Option<f64> {
        let lookups = self.hits + self.misses;
        (lookups > 0).then(|| self.hits as f64 / lookups as f64)
    }

    /// From the first call to the last.
    pub fn duration(&self) -> Duration {
        self.last_seen
            .duration_since(self.first_seen)
            .unwrap_or_default()
    }
}

/// ActionCache lookups in one minute (of any caller).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Minute {
    /// Minutes since the Unix epoch.
    pub minute: u64,
    pub hits: u64,
    pub misses: u64,
}

#[derive(Debug, Default)]
struct State {
    invocations: HashMap<String, Invocation>,
    /// The last [`MINUTES`] minutes that saw a lookup, oldest first.
    minutes: VecDeque<Minute>,
}

/// Every invocation's record (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Invocations {
    state: Mutex<State>,
}

/// Counts `key` in `counts`, or under `(other)` once `limit` names are counted.
fn count(counts: &mut HashMap<String, u64>, key: &str, limit: usize) {
    let key = if key.is_empty() { "(none)" } else { key };
    if let Some(c) = counts.get_mut(key) {
        *c += 1;
    } else if counts.len() < limit {
        counts.insert(key.to_owned(), 1);
    } else {
        *counts.entry("(other)".to_owned()).or_insert(0) += 1;
    }
}

impl Invocations {
    /// Counts one call.
    pub fn record(&self, call: Call) {
        self.record_at(call, SystemTime::now());
    }

    fn record_at(&self, call: Call, now: SystemTime) {
        let for_invocation = call
            .caller
            .as_ref()
            .is_some_and(|c| !c.invocation_id.is_empty());
        if call.lookup.is_none() && !for_invocation {
            return; // nothing to count: no lock taken
        }
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if let Some(lookup) = call.lookup {
            let minute = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / 60;
            if state.minutes.back().is_none_or(|m| m.minute != minute) {
                state.minutes.push_back(Minute {
                    minute,
                    ..Default::default()
                });
                while state.minutes.len() > MINUTES {
                    state.minutes.pop_front();
                }
            }
            if let Some(m) = state.minutes.back_mut() {
                match lookup {
                    Lookup::Hit => m.hits += 1,
                    Lookup::Miss | Lookup::OutputsGone => m.misses += 1,
                }
            }
        }
        let Some(caller) = call.caller.filter(|c| !c.invocation_id.is_empty()) else {
            return;
        };
        if !state.invocations.contains_key(&caller.invocation_id)
            && state.invocations.len() >= INVOCATIONS
        {
            // A new invocation past the bound: the least recently seen one goes.
            let oldest = state
                .invocations
                .values()
                .min_by_key(|i| i.last_seen)
                .map(|i| i.id.clone());
            if let Some(id) = oldest {
                state.invocations.remove(&id);
            }
        }
        if !state.invocations.contains_key(&caller.invocation_id) {
            state.invocations.insert(
                caller.invocation_id.clone(),
                Invocation {
                    id: caller.invocation_id.clone(),
                    tool: caller.tool.clone(),
                    correlated_id: caller.correlated_id.clone(),
                    identity: None,
                    first_seen: now,
                    last_seen: now,
                    requests: 0,
                    hits: 0,
                    misses: 0,
                    misses_outputs_gone: 0,
                    bytes_down: 0,
                    bytes_up: 0,
                    mnemonics: HashMap::new(),
                    targets: HashMap::new(),
                    missed: Vec::new(),
                },
            );
        }
        let Some(inv) = state.invocations.get_mut(&caller.invocation_id) else {
            return;
        };
        inv.last_seen = inv.last_seen.max(now);
        inv.requests += 1;
        inv.bytes_down += call.bytes_down;
        inv.bytes_up += call.bytes_up;
        if call.identity.is_some() {
            inv.identity = call.identity;
        }
        if inv.tool.is_empty() {
            inv.tool = caller.tool.clone();
        }
        match call.lookup {
            Some(Lookup::Hit) => inv.hits += 1,
            Some(miss @ (Lookup::Miss | Lookup::OutputsGone)) => {
                inv.misses += 1;
                let outputs_gone = miss == Lookup::OutputsGone;
                if outputs_gone {
                    inv.misses_outputs_gone += 1;
                }
                count(&mut inv.mnemonics, &caller.mnemonic, MNEMONICS_KEPT);
                count(&mut inv.targets, &caller.target, TARGETS_KEPT);
                if inv.missed.len() < MISSES_KEPT {
                    inv.missed.push(Miss {
                        at: now,
                        action_id: caller.action_id,
                        mnemonic: caller.mnemonic,
                        target: caller.target,
                        outputs_gone,
                    });
                }
            }
            None => {}
        }
    }

    /// The invocations, most recently seen first.
    pub fn recent(&self) -> Vec<Invocation> {
        let Ok(state) = self.state.lock() else {
            return Vec::new();
        };
        let mut v: Vec<Invocation> = state.invocations.values().cloned().collect();
        v.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then_with(|| a.id.cmp(&b.id)));
        v
    }

    /// One invocation, by id.
    pub fn get(&self, id: &str) -> Option<Invocation> {
        self.state.lock().ok()?.invocations.get(id).cloned()
    }

    /// ActionCache lookups per minute over the hour up to `now`, oldest first: 60 entries, a
    /// minute without lookups as zeros.
    pub fn last_hour(&self, now: SystemTime) -> Vec<Minute> {
        let this = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / 60;
        let seen: Vec<Minute> = self
            .state
            .lock()
            .map(|s| s.minutes.iter().copied().collect())
            .unwrap_or_default();
        (0..MINUTES as u64)
            .rev()
            .map(|ago| {
                let minute = this.saturating_sub(ago);
                seen.iter()
                    .find(|m| m.minute == minute)
                    .copied()
                    .unwrap_or(Minute {
                        minute,
                        ..Default::default()
                    })
            })
            .collect()
    }
}

/// A body that counts the bytes of its data frames into `tally` as they pass, and calls
/// `on_drop` (once) when it is dropped: at the end of a response, or when the call is
/// abandoned.
pub(crate) struct Counted<B> {
    pub inner: B,
    pub tally: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub on_drop: Option<Box<dyn FnOnce() + Send>>,
}

impl<B: hyper::body::Body<Data = bytes::Bytes> + Unpin> hyper::body::Body for Counted<B> {
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, B::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.tally
                .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        if let Some(f) = self.on_drop.take() {
            f();
        }
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn call(inv: &str, lookup: Option<Lookup>, target: &str) -> Call {
        Call {
            caller: Some(Caller {
                tool: "bazel 4.2.3".into(),
                invocation_id: inv.into(),
                action_id: format!("action-of-{target}"),
                mnemonic: "Genrule".into(),
                target: target.into(),
                ..Default::default()
            }),
            identity: Some("ci".into()),
            lookup,
            bytes_up: 10,
            bytes_down: 100,
        }
    }

    #[test]
    fn counts_per_invocation_and_lists_misses() {
        let invs = Invocations::default();
        let t0 = UNIX_EPOCH + Duration::from_secs(60 * 20_000);
        invs.record_at(call("a", Some(Lookup::Hit), "//:x"), t0);
        invs.record_at(
            call("a", Some(Lookup::Miss), "//:y"),
            t0 + Duration::from_secs(5),
        );
        invs.record_at(
            call("a", Some(Lookup::OutputsGone), "//:y"),
            t0 + Duration::from_secs(9),
        );
        invs.record_at(call("a", None, ""), t0 + Duration::from_secs(9));
        invs.record_at(call("b", Some(Lookup::Hit), "//:x"), t0);
        let a = invs.get("a").unwrap();
        assert_eq!((a.hits, a.misses, a.misses_outputs_gone), (1, 2, 1));
        assert_eq!((a.requests, a.bytes_up, a.bytes_down), (4, 40, 400));
        assert_eq!(a.duration(), Duration::from_secs(9));
        assert_eq!(Invocation::top(&a.targets, 5), vec![("//:y".to_owned(), 2)]);
        assert_eq!(a.missed.len(), 2);
        assert!(a.missed[1].outputs_gone);
        assert_eq!(a.identity.as_deref(), Some("ci"));
        assert_eq!(invs.recent()[0].id, "a", "most recently seen first");
        let hour = invs.last_hour(t0 + Duration::from_secs(30));
        assert_eq!(hour.len(), 60);
        assert_eq!((hour[59].hits, hour[59].misses), (2, 2));
        assert_eq!(hour[58].hits + hour[58].misses, 0);
    }

    #[test]
    fn every_table_is_bounded() {
        let invs = Invocations::default();
        let t0 = UNIX_EPOCH + Duration::from_secs(60 * 20_000);
        for i in 0..INVOCATIONS + 10 {
            invs.record_at(
                call(&format!("inv-{i}"), None, ""),
                t0 + Duration::from_secs(i as u64),
            );
        }
        assert_eq!(invs.recent().len(), INVOCATIONS);
        assert!(
            invs.get("inv-0").is_none(),
            "the least recently seen went first"
        );
        assert!(invs.get(&format!("inv-{}", INVOCATIONS + 9)).is_some());
        for i in 0..TARGETS_KEPT + MISSES_KEPT + 5 {
            invs.record_at(call("big", Some(Lookup::Miss), &format!("//t:{i}")), t0);
        }
        let big = invs.get("big").unwrap();
        assert_eq!(big.missed.len(), MISSES_KEPT);
        assert_eq!(big.targets.len(), TARGETS_KEPT + 1);
        assert_eq!(big.targets["(other)"], (MISSES_KEPT + 5) as u64);
        assert_eq!(cut(&"é".repeat(200)).len(), TEXT_BYTES);
    }
}

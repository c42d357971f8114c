//! A progress bar for large transfers (downloads; `recache cache save`'s uploads), shown only
//! when stderr is a terminal and more than a few MiB move.

use std::io::IsTerminal;
use std::time::Duration;

use store::LocalStore;

/// Below this many bytes no bar is shown: small hits stay silent.
const SHOW_AFTER_BYTES: u64 = 4 * 1024 * 1024;

pub struct Progress {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// Starts watching `local`'s received-bytes counter.
    pub fn start(local: LocalStore) -> Progress {
        let base = local.bytes_received();
        Self::watching("downloading", move || local.bytes_received() - base)
    }

    /// Starts watching `store`'s sent-bytes counter.
    pub fn uploads(store: store::Store) -> Progress {
        let base = store.bytes_sent();
        Self::watching("uploading", move || store.bytes_sent() - base)
    }

    /// Starts watching a counter of bytes moved so far (`verb`: what is moving them).
    pub fn watching(verb: &'static str, moved: impl Fn() -> u64 + Send + 'static) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress { task: None };
        }
        let task = tokio::spawn(async move {
            let mut bar: Option<indicatif::ProgressBar> = None;
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let got = moved();
                if got < SHOW_AFTER_BYTES {
                    continue;
                }
                let b = bar.get_or_insert_with(|| {
                    let b = indicatif::ProgressBar::new_spinner();
                    if let Ok(style) = indicatif::ProgressStyle::with_template(&format!(
                        "{{spinner}} recache: {verb} {{bytes}} ({{binary_bytes_per_sec}})"
                    )) {
                        b.set_style(style);
                    }
                    b
                });
                b.set_position(got);
            }
        });
        Progress { task: Some(task) }
    }

    /// Removes the bar.
    pub fn finish(self) {
        if let Some(t) = self.task {
            t.abort();
        }
    }
}

//! The local runner as a build engine sees it.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hashing::Digest;
use process_execution::{
    CommandRunner, Context, KeepSandboxes, LocalRunner, LocalRunnerOptions, Process, ProcessError,
};
use store::{LocalStore, LocalStoreOptions, MaterializeOptions, Store};

struct Fixture {
    dir: tempfile::TempDir,
    runner: LocalRunner,
}

impl Fixture {
    fn new() -> Fixture {
        Self::with(|_| {})
    }

    fn with(tweak: impl FnOnce(&mut LocalRunnerOptions)) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalStore::open(LocalStoreOptions::new(dir.path().join("store"))).unwrap();
        let mut options = LocalRunnerOptions::new(dir.path().join("sandboxes"));
        tweak(&mut options);
        Fixture {
            runner: LocalRunner::new(Store::local_only(local), options),
            dir,
        }
    }

    fn local(&self) -> &LocalStore {
        self.runner.store().local()
    }

    /// A scratch directory outside any sandbox, for processes to leave evidence in.
    fn scratch(&self) -> PathBuf {
        let p = self.dir.path().join("scratch");
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn sandbox_count(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("sandboxes"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

fn sh(script: &str) -> Process {
    Process::new(["/bin/sh", "-c", script]).env("PATH", "/usr/bin:/bin")
}

async fn run(f: &Fixture, p: Process) -> process_execution::ProcessResult {
    f.runner.run(Context::default(), p).await.unwrap()
}

fn text(f: &Fixture, d: Digest) -> String {
    String::from_utf8(f.local().load_bytes(d).unwrap().unwrap().to_vec()).unwrap()
}

fn materialize(f: &Fixture, d: Digest) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    f.local()
        .materialize_directory(d, &out.path().join("o"), MaterializeOptions::default())
        .unwrap();
    out
}

#[tokio::test]
async fn exit_codes_and_signals() {
    let f = Fixture::new();
    assert_eq!(run(&f, sh("exit 0")).await.exit_code, 0);
    assert_eq!(run(&f, sh("exit 3")).await.exit_code, 3);
    assert_eq!(run(&f, sh("kill -TERM $$")).await.exit_code, -15);
    assert_eq!(f.sandbox_count(), 0, "sandboxes are removed");
}

#[tokio::test]
async fn stdout_and_stderr_of_20_mib_are_captured() {
    let f = Fixture::new();
    let r = run(&f, sh("head -c 20971520 /dev/zero; echo oops >&2")).await;
    assert_eq!(r.exit_code, 0);
    assert_eq!(r.stdout, Digest::of_bytes(&vec![0u8; 20 * 1024 * 1024]));
    assert_eq!(text(&f, r.stderr), "oops\n");
    // 20 MiB is pool-sized: it landed in the pool, not in memory.
    assert!(f.local().load_file(r.stdout).unwrap().is_some());
}

#[tokio::test]
async fn the_environment_is_hermetic() {
    // SAFETY of the test: a variable the runner must not leak into the process.
    let f = Fixture::new();
    let p = Process::new(["/usr/bin/env"]).env("ONLY", "this");
    let r = run(&f, p).await;
    assert_eq!(text(&f, r.stdout), "ONLY=this\n");

    // Without PATH, a bare command name is not found (recache's own PATH is not used), and
    // the error says why.
    let err = f
        .runner
        .run(Context::default(), Process::new(["sh", "-c", "true"]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("has no PATH"), "{err}");
}

#[tokio::test]
async fn inputs_are_materialized_read_only() {
    let f = Fixture::new();
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("sub")).unwrap();
    std::fs::write(src.path().join("sub/in.txt"), "input data").unwrap();
    let root = f.local().capture_directory(src.path()).unwrap();
    // Tests may run as root, which can write anything: check the mode rather than a write.
    let mut p = sh("cat in.txt; stat -c ' %a' in.txt").input_root(root);
    p.working_directory = "sub".into();
    let r = run(&f, p).await;
    assert_eq!(text(&f, r.stdout), "input data 444\n");
}

#[tokio::test]
async fn outputs_files_nested_dirs_executables_symlinks() {
    let f = Fixture::new();
    let script = "mkdir -p out/nested/deep && echo a > out/a.txt && \
                  printf '#!/bin/sh\\n' > out/nested/tool && chmod +x out/nested/tool && \
                  echo leaf > out/nested/deep/leaf && ln -s a.txt out/link && \
                  echo single > single.txt && head -c 1048576 /dev/zero > big.bin";
    let p = sh(script)
        .output_files(["single.txt", "big.bin", "not-produced.txt"])
        .output_directories(["out", "missing-dir"]);
    let r = run(&f, p).await;
    assert_eq!(r.exit_code, 0, "{}", text(&f, r.stderr));
    let out = materialize(&f, r.output_root);
    let o = out.path().join("o");
    assert_eq!(
        std::fs::read_to_string(o.join("single.txt")).unwrap(),
        "single\n"
    );
    assert_eq!(std::fs::read_to_string(o.join("out/a.txt")).unwrap(), "a\n");
    assert_eq!(
        std::fs::read_to_string(o.join("out/nested/deep/leaf")).unwrap(),
        "leaf\n"
    );
    assert_eq!(
        std::fs::metadata(o.join("big.bin")).unwrap().len(),
        1024 * 1024
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(o.join("out/nested/tool"))
            .unwrap()
            .permissions(),
    );
    assert!(mode & 0o111 != 0, "executable bit kept: {mode:o}");
    assert_eq!(
        std::fs::read_link(o.join("out/link")).unwrap(),
        Path::new("a.txt")
    );
    // Declared but not produced: simply absent.
    assert!(!o.join("not-produced.txt").exists());
    assert!(!o.join("missing-dir").exists());
}

#[tokio::test]
async fn output_symlinks_escaping_the_sandbox_are_rejected() {
    let f = Fixture::new();
    for (script, files, dirs) in [
        ("ln -s /etc/passwd evil", vec!["evil"], vec![]),
        ("ln -s ../../../../../../etc evil", vec!["evil"], vec![]),
        ("mkdir d && ln -s ../../../../.. d/up", vec![], vec!["d"]),
        // An output directory that is itself a symlink out of the sandbox.
        ("ln -s /tmp d", vec![], vec!["d"]),
        // A chain: textually inside d/, really out through `a -> .`.
        (
            "mkdir d && ln -s . d/a && ln -s a/a/../.. d/b",
            vec![],
            vec!["d"],
        ),
        // A symlink to a symlink that leaves.
        (
            "mkdir d && ln -s .. d/up && ln -s up/.. d/via",
            vec![],
            vec!["d"],
        ),
    ] {
        let p = sh(script).output_files(files).output_directories(dirs);
        let err = f.runner.run(Context::default(), p).await.unwrap_err();
        assert!(
            err.to_string().contains("escapes the sandbox"),
            "{script}: {err}"
        );
    }
    // A symlink that stays inside is fine, chains included.
    let p = sh("echo hi > real && ln -s real ok").output_files(["ok", "real"]);
    assert_eq!(run(&f, p).await.exit_code, 0);
    let p = sh("mkdir -p d/e && ln -s e d/deep && ln -s deep/.. d/back").output_directories(["d"]);
    assert_eq!(run(&f, p).await.exit_code, 0);
}

#[tokio::test]
async fn unsafe_output_paths_are_refused_before_running() {
    let f = Fixture::new();
    let marker = f.scratch().join("ran");
    for bad in ["../x", "/abs", "a/../b", ""] {
        let p = sh(&format!("touch {}", marker.display())).output_files([bad]);
        assert!(
            f.runner.run(Context::default(), p).await.is_err(),
            "{bad:?}"
        );
    }
    assert!(!marker.exists(), "nothing ran");
}

/// True when `pid` no longer runs (gone, or a zombie awaiting its new parent).
fn is_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

async fn wait_for_file(p: &Path) -> String {
    for _ in 0..500 {
        if let Ok(s) = std::fs::read_to_string(p)
            && s.ends_with('\n')
        {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} never appeared", p.display());
}

#[tokio::test]
async fn timeout_kills_the_process_and_its_children() {
    let f = Fixture::new();
    let pidfile = f.scratch().join("child.pid");
    let script = format!("sleep 100 & echo $! > {}; sleep 100", pidfile.display());
    let start = std::time::Instant::now();
    let r = run(&f, sh(&script).timeout(Duration::from_millis(500))).await;
    assert!(r.metadata.timed_out);
    assert_ne!(r.exit_code, 0);
    assert!(start.elapsed() < Duration::from_secs(10));
    let child: i32 = wait_for_file(&pidfile).await.trim().parse().unwrap();
    for _ in 0..100 {
        if is_dead(child) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("grandchild {child} survived the timeout");
}

#[tokio::test]
async fn cancelling_the_run_kills_the_child() {
    let f = Fixture::new();
    let pidfile = f.scratch().join("self.pid");
    let script = format!("echo $$ > {}; sleep 100", pidfile.display());
    let runner = f.runner.clone();
    let task = tokio::spawn(async move { runner.run(Context::default(), sh(&script)).await });
    let pid: i32 = wait_for_file(&pidfile).await.trim().parse().unwrap();
    assert!(!is_dead(pid));
    task.abort();
    let _ = task.await;
    for _ in 0..100 {
        if is_dead(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("process {pid} survived the cancelled run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallelism_bound_is_honored() {
    let f = Fixture::with(|o| o.parallelism = 2);
    let scratch = f.scratch();
    let runs: Vec<_> = (0..6)
        .map(|i| {
            let runner = f.runner.clone();
            let log = scratch.join(format!("run{i}"));
            let script = format!(
                "date +%s%N > {0}; sleep 0.3; date +%s%N >> {0}",
                log.display()
            );
            tokio::spawn(async move { runner.run(Context::default(), sh(&script)).await })
        })
        .collect();
    for r in futures_join(runs.into_iter()).await {
        assert_eq!(r.unwrap().unwrap().exit_code, 0);
    }
    let mut events: Vec<(u128, i32)> = vec![];
    for i in 0..6 {
        let s = std::fs::read_to_string(scratch.join(format!("run{i}"))).unwrap();
        let t: Vec<u128> = s.lines().map(|l| l.parse().unwrap()).collect();
        events.push((t[0], 1));
        events.push((t[1], -1));
    }
    events.sort();
    let (mut cur, mut max) = (0, 0);
    for (_, delta) in events {
        cur += delta;
        max = max.max(cur);
    }
    assert_eq!(max, 2, "at most (and, here, exactly) 2 processes at once");
}

async fn futures_join<T>(
    handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<Result<T, tokio::task::JoinError>> {
    let mut out = vec![];
    for h in handles {
        out.push(h.await);
    }
    out
}

#[tokio::test]
async fn sandboxes_can_be_kept_for_debugging() {
    let f = Fixture::with(|o| o.keep_sandboxes = KeepSandboxes::OnFailure);
    run(&f, sh("echo ok > kept.txt")).await;
    assert_eq!(f.sandbox_count(), 0);
    run(&f, sh("echo bad > kept.txt; exit 1")).await;
    assert_eq!(f.sandbox_count(), 1);
    let kept = std::fs::read_dir(f.dir.path().join("sandboxes"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(
        std::fs::read_to_string(kept.join("root/kept.txt")).unwrap(),
        "bad\n"
    );
}

#[tokio::test]
async fn a_missing_input_root_is_a_typed_missing_digest() {
    let f = Fixture::new();
    let absent = Digest::of_bytes(b"no such directory");
    let err = f
        .runner
        .run(Context::default(), sh("true").input_root(absent))
        .await
        .unwrap_err();
    match err {
        ProcessError::MissingDigest { digest, .. } => assert_eq!(digest, absent),
        other => panic!("expected MissingDigest, got {other:?}"),
    }
}

#[tokio::test]
async fn the_environment_map_is_passed_exactly() {
    let f = Fixture::new();
    let env: BTreeMap<String, String> = [("A", "1"), ("B", "two words"), ("PATH", "/bin")]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    let mut p = Process::new(["/usr/bin/env"]);
    p.env = env;
    let r = run(&f, p).await;
    assert_eq!(text(&f, r.stdout), "A=1\nB=two words\nPATH=/bin\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_runs_leave_no_sandbox_behind() {
    let f = Fixture::new();
    // An input root large enough that materializing it takes a while on its blocking thread.
    let src = tempfile::tempdir().unwrap();
    for i in 0..400 {
        std::fs::write(src.path().join(format!("f{i}")), format!("input {i}\n")).unwrap();
    }
    let input = f.local().capture_directory(src.path()).unwrap();
    for i in 0..80u64 {
        let p = sh("true").input_root(input);
        // Cancel at different points: before, during and after materializing.
        let _ = tokio::time::timeout(
            Duration::from_micros(200 * (i % 20)),
            f.runner.run(Context::default(), p),
        )
        .await;
    }
    // The blocking tasks of cancelled runs finish on their own; then nothing may be left.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while f.sandbox_count() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} sandbox(es) left behind by cancelled runs",
            f.sandbox_count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn stale_sandboxes_are_cleared_at_start_but_not_live_or_kept_ones() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("sandboxes");
    let make = |name: &str| {
        let d = root.join(name);
        std::fs::create_dir_all(d.join("root/deep")).unwrap();
        std::fs::write(d.join("lock"), b"").unwrap();
        d
    };
    let crashed = make("recache-sandbox-crashed");
    let live = make("recache-sandbox-live");
    let held = std::fs::File::open(live.join("lock")).unwrap();
    held.lock().unwrap();
    let kept = make("recache-sandbox-kept");
    std::fs::write(kept.join("KEPT"), b"").unwrap();
    let other = root.join("not-a-sandbox");
    std::fs::create_dir_all(&other).unwrap();
    let local = LocalStore::open(LocalStoreOptions::new(dir.path().join("store"))).unwrap();
    let _runner = LocalRunner::new(Store::local_only(local), LocalRunnerOptions::new(&root));
    assert!(!crashed.exists(), "a crashed run's sandbox is cleared");
    assert!(live.exists(), "a sandbox in use elsewhere stays");
    assert!(kept.exists(), "a kept sandbox stays");
    assert!(other.exists(), "only sandboxes are touched");
    drop(held);
}

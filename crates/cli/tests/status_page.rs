//! Issue 25 §3: `recache serve`'s status page in a real browser. A server with a CI write
//! token (anonymous callers may read) serves a real Bazel 4.2.3 build twice, each with its own
//! `--invocation_id` (the second after one genrule changed, so exactly that one misses), and
//! `recache run` twice under one `--invocation-id`; headless Chromium (Debian's, installed by
//! `scripts/install-apt.sh chromium`) then loads `/` and each invocation's page with
//! `--dump-dom`, and the DOM must name the invocations, their counts, who called, and the
//! missed targets with their action ids. Under `CI=true` a missing Chromium or Bazel fails.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::process::Command;

use testutil::clients::{Killed, bazel};

use testutil::real_servers::in_ci;

/// The first of `names` that runs `--version`, or a loud skip (a failure in CI).
fn tool(names: &[&str], install: &str) -> Option<String> {
    for n in names {
        if Command::new(n)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Some((*n).to_owned());
        }
    }
    let msg = format!("none of {names:?} on PATH: run {install}");
    assert!(!in_ci(), "CI=true, so this is a failure, not a skip: {msg}");
    eprintln!("\n*** SKIPPED (not in CI): {msg}\n");
    None
}

/// Chromium's headless arguments: root (as CI runs) needs `--no-sandbox`; the profile lives
/// in `profile` so nothing of the user's is touched.
fn chromium(bin: &str, profile: &Path, extra: &[&str], url: &str) -> String {
    let out = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed on {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn genrules(ws: &Path, salt: &str, changed: Option<usize>) {
    let mut build = String::new();
    for i in 0..4 {
        let extra = if changed == Some(i) { " changed" } else { "" };
        build += &format!(
            "genrule(name = \"g{i}\", outs = [\"g{i}.txt\"], cmd = \"echo {salt}-{i}{extra} > $@\")\n"
        );
    }
    std::fs::write(ws.join("BUILD"), build).unwrap();
}

fn curl_json(url: &str) -> serde_json::Value {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "10", url])
        .output()
        .unwrap();
    assert!(out.status.success(), "GET {url} failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn chromium_shows_what_each_build_hit_and_missed() {
    let Some(browser) = tool(
        &["chromium", "chromium-browser"],
        "scripts/install-apt.sh chromium",
    ) else {
        return;
    };
    let Some(bazel_bin) = tool(&["bazel"], "scripts/install-bazel.sh") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "ci-secret write ci-bot\n").unwrap();
    let (server, grpc, http) = testutil::real_servers::spawn_serve_with_http_args(
        Path::new(env!("CARGO_BIN_EXE_recache")),
        &dir.path().join("server"),
        &[
            "--auth-tokens",
            tokens.to_str().unwrap(),
            "--anonymous",
            "read",
        ],
    );
    let _server = Killed(server);

    // Bazel: a first build (every genrule misses and is written), then one genrule changed and
    // built again after a clean: that one misses, the others hit.
    let (ws, root) = (dir.path().join("ws"), dir.path().join("bazel-root"));
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::write(ws.join("WORKSPACE"), "").unwrap();
    let salt = uuid::Uuid::new_v4().simple().to_string();
    let (first_id, second_id) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let remote = [
        format!("--remote_cache={grpc}"),
        "--remote_header=authorization=Bearer ci-secret".to_owned(),
    ];
    genrules(&ws, &salt, None);
    let first_flag = format!("--invocation_id={first_id}");
    let mut args = vec!["build", "//:all", &first_flag];
    args.extend(remote.iter().map(String::as_str));
    bazel(&bazel_bin, &root, &ws, &args);
    bazel(&bazel_bin, &root, &ws, &["clean"]);
    genrules(&ws, &salt, Some(2));
    let second_flag = format!("--invocation_id={second_id}");
    let mut args = vec!["build", "//:all", &second_flag];
    args.extend(remote.iter().map(String::as_str));
    let again = bazel(&bazel_bin, &root, &ws, &args);
    assert!(again.contains("3 remote cache hit"), "{again}");
    bazel(&bazel_bin, &root, &ws, &["shutdown"]);

    // recache run: a miss then a hit, one invocation (a CI job's id), a target of its own.
    let job = format!("ci-job-{}", &salt[..8]);
    let rws = dir.path().join("rws");
    std::fs::create_dir_all(&rws).unwrap();
    for cache in ["c1", "c2"] {
        let out = Command::new(env!("CARGO_BIN_EXE_recache"))
            .current_dir(&rws)
            .env("RECACHE_CACHE_DIR", dir.path().join(cache))
            .args(["run", "--remote", &grpc, "--invocation-id", &job])
            .args(["--target", "//demo:hello", "--header"])
            .arg("authorization=Bearer ci-secret")
            .args(["--", "sh", "-c", &format!("echo {salt} > out.txt")])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    // The JSON first, for exact figures.
    let status = curl_json(&format!("{http}/status"));
    let find = |id: &str| {
        status["invocations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == id)
            .unwrap_or_else(|| panic!("invocation {id} not in /status: {status}"))
            .clone()
    };
    let (first, second, run) = (
        find(&first_id.to_string()),
        find(&second_id.to_string()),
        find(&job),
    );
    assert_eq!(
        (first["hits"].as_u64(), first["misses"].as_u64()),
        (Some(0), Some(4))
    );
    assert_eq!(
        (second["hits"].as_u64(), second["misses"].as_u64()),
        (Some(3), Some(1))
    );
    assert_eq!(
        (run["hits"].as_u64(), run["misses"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(
        second["tool"].as_str().unwrap().starts_with("bazel"),
        "{second}"
    );
    assert_eq!(second["identity"], "ci-bot");
    assert!(first["bytes_up"].as_u64().unwrap() > 0, "{first}");
    assert!(second["bytes_down"].as_u64().unwrap() > 0, "{second}");
    let detail = curl_json(&format!("{http}/status/invocations/{second_id}"));
    let missed = detail["missed"].as_array().unwrap();
    assert_eq!(missed.len(), 1, "{detail}");
    let action_id = missed[0]["action_id"].as_str().unwrap().to_owned();
    assert_eq!(action_id.len(), 64, "{detail}");
    assert_eq!(missed[0]["target"], "//:g2", "{detail}");
    assert_eq!(missed[0]["mnemonic"], "Genrule", "{detail}");
    let hour: u64 = status["last_hour"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["hits"].as_u64().unwrap() + m["misses"].as_u64().unwrap())
        .sum();
    assert_eq!(hour, 4 + 4 + 2, "every lookup is in the hour's chart");

    // The browser: the overview, then each invocation's page.
    let profile = dir.path().join("chromium-profile");
    let page = chromium(&browser, &profile, &["--dump-dom"], &format!("{http}/"));
    for needle in [
        first_id.to_string(),
        second_id.to_string(),
        job.clone(),
        "ci-bot".into(),
        "bazel".into(),
        "<svg".into(),
        "75 %".into(),
    ] {
        assert!(
            page.contains(&needle),
            "{needle:?} not on the page:\n{page}"
        );
    }
    let second_page = chromium(
        &browser,
        &profile,
        &["--dump-dom"],
        &format!("{http}/invocations/{second_id}"),
    );
    for needle in [
        "//:g2",
        "Genrule",
        &action_id,
        "3 hits, 1 misses",
        "not recorded",
    ] {
        assert!(
            second_page.contains(needle),
            "{needle:?} not on the invocation's page:\n{second_page}"
        );
    }
    assert!(
        !second_page.contains("//:g1"),
        "only what missed is listed:\n{second_page}"
    );
    let run_page = chromium(
        &browser,
        &profile,
        &["--dump-dom"],
        &format!("{http}/invocations/{job}"),
    );
    assert!(run_page.contains("//demo:hello"), "{run_page}");
    assert!(run_page.contains("1 hits, 1 misses"), "{run_page}");

    // The README's screenshot command, kept where a developer can look at it.
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        &browser,
        &profile,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,900",
        ],
        &format!("{http}/"),
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    eprintln!("status page screenshot: {}", shot.display());
}

//! The `dbopt-router` binary's command line: exit codes and messages a user and a script rely on.

use std::process::Command;

fn router(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dbopt-router"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run dbopt-router");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_accepts_the_example_and_prints_defaults() {
    let (code, out, _) = router(&["--config", "dbopt-router.example.toml", "--check-config"]);
    assert_eq!(code, 0);
    assert!(out.contains("valid; effective configuration"), "{out}");
    assert!(
        out.contains("idle_timeout_s = 300"),
        "defaults are filled in: {out}"
    );
}

#[test]
fn check_config_names_the_bad_field() {
    let dir = std::env::temp_dir().join(format!("dbopt-router-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let bad = dir.join("bad.toml");
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dbopt-router.example.toml"
    ))
    .expect("example");
    std::fs::write(&bad, example.replace("min_size = 10", "min_size = 60")).expect("write");
    let (code, _, err) = router(&["--config", &bad.to_string_lossy(), "--check-config"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("pool.min_size: 60 exceeds pool.max_size 50"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_file_and_unknown_flags_fail() {
    let (code, _, err) = router(&["--config", "/nonexistent.toml", "--check-config"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent.toml"), "{err}");
    let (code, _, err) = router(&["--frobnicate"]);
    assert_eq!(code, 2, "clap's usage error");
    assert!(err.contains("--frobnicate"), "{err}");
}

#[test]
#[allow(clippy::unwrap_used)]
fn a_taken_listen_address_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = std::env::temp_dir().join(format!("dbopt-router-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("taken.toml");
    let text = std::fs::read_to_string("dbopt-router.example.toml")
        .unwrap()
        .replace("127.0.0.1:25450", &addr.to_string());
    std::fs::write(&path, text).unwrap();
    let (code, _, err) = router(&["--config", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("in use"), "{err}");
}

#[test]
fn version_and_help() {
    let (code, out, _) = router(&["--version"]);
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        format!("dbopt-router {}", env!("CARGO_PKG_VERSION"))
    );
    let (code, out, _) = router(&["--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("--check-config") && out.contains("Examples:"),
        "{out}"
    );
}

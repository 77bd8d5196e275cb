//! `./deploy/up.sh`, the first command of the README, works: `--smoke` starts NATS and the
//! three services on the example monorepo, sends a signed push and a signed manual sync, and
//! succeeds only when both services were deployed by their real `invoke` tasks.

use std::process::Command;

use iac_tests::free_port;
use iac_tests::tools::{project_binary, workspace_root};

#[test]
fn up_sh_runs_the_pipeline_on_the_example_monorepo() {
    let run_dir = tempfile::tempdir().unwrap();
    let output = Command::new("bash")
        .arg(workspace_root().join("deploy/up.sh"))
        .arg("--smoke")
        .env("IAC_RUN_DIR", run_dir.path())
        // The binaries this test run uses: the same code, no second build.
        .env(
            "IAC_BIN_DIR",
            project_binary("iac-gateway").parent().unwrap(),
        )
        .env("WEBHOOK_PORT", free_port().to_string())
        .env("NATS_PORT", free_port().to_string())
        .env_remove("WEBHOOK_SECRET")
        .env_remove("GITHUB_TOKEN")
        .output()
        .expect("running deploy/up.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "up.sh --smoke failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("\"status\":\"accepted\""), "{stdout}");
    let state = run_dir.path().join("state");
    for service in ["platform__postgres", "platform__redis"] {
        assert!(
            state.join(format!("{service}.hash")).exists(),
            "{service} not deployed"
        );
    }
    // Only the changed service and the requested one were deployed: bootstrap never.
    let deployed: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(deployed.len(), 2, "{deployed:?}");
}

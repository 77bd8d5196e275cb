//! Environment variables set to the empty string count as unset.
//!
//! Compose files pass `NAME: ${NAME:-}` for optional settings, so an unset variable arrives
//! as `""`; clap would parse that as a value and fail with `invalid value ''`.
//!
//! One variable is the exception: `PUSH_ENV=` (empty) means "pushes deploy to no named
//! environment", which differs from unset (the default, `production`).

use clap::Command;

/// Variables whose empty value is a value, read by the argument's own parser.
const EMPTY_IS_A_VALUE: &[&str] = &["PUSH_ENV"];

/// `command` with every argument whose variable is set but empty no longer reading it, in
/// subcommands too, so the argument falls back to its default or stays absent.
pub fn empty_is_unset(command: Command) -> Command {
    command
        .mut_args(|arg| {
            let empty = arg
                .get_env()
                .filter(|name| !EMPTY_IS_A_VALUE.iter().any(|v| **name == **v))
                .and_then(std::env::var_os)
                .is_some_and(|value| value.is_empty());
            if empty {
                arg.env(None::<&'static str>)
            } else {
                arg
            }
        })
        .mut_subcommands(empty_is_unset)
}

/// Set in the child process [`in_child_with_empty_variables`] starts.
const CHILD_MARKER: &str = "IAC_EMPTY_VARIABLES_CHILD";

/// For unit tests: true in a child process of the test binary where every variable `command`
/// reads is set to the empty string. In the test's own process it starts that child, running
/// only the test `name` of the module `module` (`module_path!()`), fails when the child fails
/// or ran no test, and returns false.
///
/// Setting the variables in the test's own process would race with the tests other threads run.
#[doc(hidden)]
pub fn in_child_with_empty_variables(module: &str, name: &str, command: &Command) -> bool {
    if std::env::var_os(CHILD_MARKER).is_some() {
        return true;
    }
    // libtest names a test by its path without the crate.
    let module = module.split_once("::").map_or("", |(_, rest)| rest);
    let test = format!("{module}::{name}");
    let variables = command.get_arguments().filter_map(|a| a.get_env());
    let output = std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", &test, "--nocapture", "--test-threads", "1"])
        .env(CHILD_MARKER, "1")
        .envs(variables.map(|name| (name, "")))
        .output()
        .expect("running the test binary again");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{test} with empty variables:\n{stdout}\n{stderr}"
    );
    false
}
